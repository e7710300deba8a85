//! The GPU backend's contract on a machine without a GPU (CI): opening a device returns a typed
//! [`Error::Device`] that names the device and what is missing, with or without the `cuda`
//! feature, and never panics. On a GPU machine the same test checks a round trip instead.

use meshflow_ops::cuda::{self, CudaDevice};
use meshflow_ops::{Device, Error, Tensor};

#[test]
fn opening_a_gpu_without_a_driver_is_a_typed_error() {
    match CudaDevice::new(0) {
        Err(Error::Device { device, reason }) => {
            assert_eq!(device, "cuda:0");
            if cfg!(feature = "cuda") {
                // This build can use CUDA; what is missing here is the driver (or a GPU).
                assert!(
                    reason.contains("libcuda") || reason.contains("GPU"),
                    "the reason names what is missing: {reason}"
                );
            } else {
                assert!(reason.contains("without the `cuda` feature"), "{reason}");
            }
        }
        Err(other) => panic!("expected Error::Device, got {other}"),
        Ok(device) => {
            // A GPU machine: the device works.
            let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.5], [3]).expect("a tensor");
            let on_gpu = device.to_device(&x).expect("upload");
            assert_eq!(on_gpu.device(), Device::Cuda(0));
            let back = cuda::to_host(&on_gpu).expect("download");
            assert_eq!(back.to_vec::<f32>().expect("f32"), vec![1.0, -2.0, 3.5]);
        }
    }
}

#[test]
fn every_entry_point_reports_the_same_typed_error() {
    if cuda::check_libraries().is_ok() {
        return; // a GPU machine: nothing is missing.
    }
    let error = cuda::check_libraries().expect_err("checked above");
    assert!(matches!(&error, Error::Device { device, .. } if device == "cuda:0"), "{error}");
    let error = cuda::device_count().expect_err("no driver, no count");
    assert!(matches!(error, Error::Device { .. }), "{error}");
    let error = CudaDevice::new(3).expect_err("no device 3");
    assert!(matches!(&error, Error::Device { device, .. } if device == "cuda:3"), "{error}");
}

#[test]
fn host_tensors_pass_through_to_host_unchanged() {
    let x = Tensor::from_vec(vec![1u8, 2, 3], [3]).expect("a tensor");
    let copy = cuda::to_host(&x).expect("host to host");
    assert!(std::sync::Arc::ptr_eq(x.storage(), copy.storage()), "no copy is made");
    assert_eq!(copy.to_vec::<u8>().expect("u8"), vec![1, 2, 3]);
}
