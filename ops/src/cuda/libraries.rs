//! Before any other cudarc call: are the driver and the CUDA libraries loadable, and is the
//! driver new enough? cudarc panics on a library or symbol it cannot load, so this is the gate
//! every entry point of the backend goes through.

use cudarc::driver::sys as driver;

use crate::{Device, Error, Result};

/// The CUDA version this build's bindings were generated for (cudarc feature `cuda-13000`).
pub(super) const BUILT_FOR: i32 = 13_000;

/// cudarc's check that a library loads.
type Presence = unsafe fn() -> bool;

/// Libraries the backend needs, with the check cudarc provides for each.
const LIBRARIES: [(&str, Presence); 4] = [
    ("libcuda (the NVIDIA driver)", driver::is_culib_present),
    ("libnvrtc", cudarc::nvrtc::sys::is_culib_present),
    ("libcublas", cudarc::cublas::sys::is_culib_present),
    ("libcublasLt", cudarc::cublaslt::sys::is_culib_present),
];

/// The libraries among driver, NVRTC, cuBLAS and cuBLASLt that cannot be loaded.
pub(super) fn missing_libraries() -> Vec<&'static str> {
    LIBRARIES
        .iter()
        // SAFETY: each check only tries to open the shared library under its candidate names.
        .filter(|(_, present)| !unsafe { present() })
        .map(|(name, _)| *name)
        .collect()
}

/// Checks that the driver and CUDA libraries load and that the driver supports CUDA 13.0, as
/// [`Error::Device`] on `cuda:0` naming what is missing.
pub fn check_libraries() -> Result<()> {
    check(Device::Cuda(0))
}

pub(super) fn check(device: Device) -> Result<()> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        let reason = format!("cannot load {} (no GPU driver or CUDA here?)", missing.join(", "));
        return Err(Error::Device { device: device.to_string(), reason });
    }
    let version = driver_version(device)?;
    if version < BUILT_FOR {
        let reason = format!(
            "the driver supports CUDA {}.{}; meshflow was built for CUDA {}.{}",
            version / 1000,
            version % 1000 / 10,
            BUILT_FOR / 1000,
            BUILT_FOR % 1000 / 10
        );
        return Err(Error::Device { device: device.to_string(), reason });
    }
    Ok(())
}

fn driver_version(device: Device) -> Result<i32> {
    let mut version = 0;
    // SAFETY: the driver library is loaded (checked above) and `version` is a valid out-pointer;
    // cuDriverGetVersion exists in every driver and needs no cuInit.
    let status = unsafe { driver::cuDriverGetVersion(&mut version) };
    match status {
        driver::CUresult::CUDA_SUCCESS => Ok(version),
        other => Err(driver_error(device, "cuDriverGetVersion", other)),
    }
}

/// Number of GPUs the driver sees (after [`check_libraries`]).
pub fn device_count() -> Result<usize> {
    count(Device::Cuda(0))
}

/// [`device_count`], with errors about `device`.
pub(super) fn count(device: Device) -> Result<usize> {
    check(device)?;
    cudarc::driver::result::init().map_err(|e| driver_error(device, "cuInit", e.0))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| driver_error(device, "cuDeviceGetCount", e.0))?;
    Ok(count.max(0) as usize)
}

/// A driver status as [`Error::Device`].
pub(super) fn driver_error(device: Device, call: &str, status: driver::CUresult) -> Error {
    Error::Device { device: device.to_string(), reason: format!("{call} failed: {status:?}") }
}
