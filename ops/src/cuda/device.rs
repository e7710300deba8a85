//! One GPU: its context and stream, the caching allocator, pinned staging for transfers, cuBLAS,
//! and the kernels compiled for it.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    result as driver, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PinnedHostSlice,
};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::launch::Launch;
use super::libraries;
use super::lt::{self, Lt};
use super::pool::{size_class, CachingPool, PoolStats};
use super::source::{AdamScalars, KernelSource, Layout, SgdScalars};
use super::spec::Spec;
use crate::tensor::CpuStorage;
use crate::{Device, Error, Op, Result, Storage, Tensor, TensorMeta};

/// Bytes of free device buffers a device keeps for reuse.
pub const POOL_LIMIT_BYTES: usize = 64 << 30;

// SAFETY: `Layout` is `repr(C)` plain data (integers only), the layout of the C struct.
unsafe impl DeviceRepr for Layout {}
// SAFETY: `AdamScalars` is `repr(C)` plain data (seven doubles), the layout of the C struct.
unsafe impl DeviceRepr for AdamScalars {}
// SAFETY: `SgdScalars` is `repr(C)` plain data (five doubles), the layout of the C struct.
unsafe impl DeviceRepr for SgdScalars {}

/// One GPU: context, stream, caching allocator, cuBLAS handle and compiled kernels. Cloning
/// shares them; every clone issues work on the same stream.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    pool: Mutex<CachingPool<CudaSlice<u8>>>,
    staging: Mutex<Option<PinnedHostSlice<u8>>>,
    functions: Mutex<HashMap<Spec, CudaFunction>>,
    /// cuBLASLt, when its handle and workspace could be made.
    lt: Option<Lt>,
    /// Whether products may use `lt` ([`CudaDevice::set_cublaslt`]).
    lt_enabled: AtomicBool,
    /// Products issued through cuBLASLt, classically for want of a plan, classically after
    /// cuBLASLt refused the call.
    paths: [AtomicU64; 3],
    architecture: (i32, i32),
    multiprocessors: usize,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.inner.ordinal)
            .field("architecture", &self.inner.architecture)
            .field("multiprocessors", &self.inner.multiprocessors)
            .finish()
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the libraries and the driver first, so a machine without them
    /// gets [`Error::Device`] naming what is missing (never a panic).
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::Cuda(ordinal);
        let count = libraries::count(device)?;
        if ordinal >= count {
            let reason = format!("the driver sees {count} GPU(s)");
            return Err(Error::Device { device: device.to_string(), reason });
        }
        let failed =
            |call: &'static str| move |e: DriverError| libraries::driver_error(device, call, e.0);
        let context = CudaContext::new(ordinal).map_err(failed("cuCtxCreate"))?;
        // SAFETY: every operation of this device runs on its one stream, in order, so cudarc's
        // per-buffer events (which order work across streams) are not needed.
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream().map_err(failed("cuStreamCreate"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Device {
            device: device.to_string(),
            reason: format!("cublasCreate failed: {e:?}"),
        })?;
        let architecture = context.compute_capability().map_err(failed("cuDeviceGetAttribute"))?;
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(failed("cuDeviceGetAttribute"))?;
        let lt = Lt::new(stream.clone(), lt::workspace_bytes(architecture.0));
        let inner = Inner {
            ordinal,
            context,
            stream,
            blas,
            pool: Mutex::new(CachingPool::new(POOL_LIMIT_BYTES)),
            staging: Mutex::new(None),
            functions: Mutex::new(HashMap::new()),
            lt,
            lt_enabled: AtomicBool::new(true),
            paths: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            architecture,
            multiprocessors: multiprocessors.max(1) as usize,
        };
        Ok(CudaDevice { inner: Arc::new(inner) })
    }

    /// The device tag, `Device::Cuda(ordinal)`.
    pub fn device(&self) -> Device {
        Device::Cuda(self.inner.ordinal)
    }

    /// Compute capability, e.g. `(9, 0)` on an H100 or H200.
    pub fn architecture(&self) -> (i32, i32) {
        self.inner.architecture
    }

    /// Number of multiprocessors.
    pub fn multiprocessors(&self) -> usize {
        self.inner.multiprocessors
    }

    /// The stream all work of this device is issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// A copy of a host tensor on this device (through a pinned staging buffer; returns once the
    /// copy is done).
    pub fn to_device(&self, tensor: &Tensor) -> Result<Tensor> {
        if let Storage::Cuda(gpu) = &**tensor.storage() {
            if gpu.device() == self.device() {
                return Ok(tensor.clone());
            }
            return self.to_device(&gpu.to_host(tensor.meta().clone())?);
        }
        self.bind()?;
        let bytes = tensor.bytes()?;
        let storage = self.storage(bytes.len())?;
        if !bytes.is_empty() {
            let mut staging = self.staging(bytes.len())?;
            let pinned = staging.as_mut().expect("staging was just sized");
            let host = pinned.as_mut_slice().map_err(|e| self.error("cuEventSynchronize", e))?;
            host[..bytes.len()].copy_from_slice(bytes);
            let stream = self.inner.stream.cu_stream();
            // SAFETY: the destination holds at least `bytes.len()` bytes; the pinned source stays
            // locked and alive until the stream is synchronised below.
            unsafe { driver::memcpy_htod_async(storage.pointer(), &host[..bytes.len()], stream) }
                .map_err(|e| self.error("cuMemcpyHtoDAsync", e))?;
            self.synchronize()?;
        }
        Tensor::from_storage(tensor.meta().clone(), Arc::new(Storage::Cuda(storage)))
    }

    /// Runs `op` on tensors that live on this device: the kernel family comes from
    /// [`super::table::kernel`]. Returns once the kernels are enqueued.
    pub fn forward(&self, op: &dyn Op, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.bind()?;
        super::kernels::forward(self, op, inputs)
    }

    /// Makes this device's context current on the calling thread. cudarc's own calls do so,
    /// but the raw calls here (copies, cuBLAS) need it too: a session downloads its fetches and
    /// reads its variables on threads that may not have run a kernel yet.
    fn bind(&self) -> Result<()> {
        self.inner.context.bind_to_thread().map_err(|e| self.error("cuCtxSetCurrent", e))
    }

    /// Waits until the stream has finished all work issued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(|e| self.error("cuStreamSynchronize", e))
    }

    /// Records an event after the work issued so far: a consumer on another stream or thread
    /// waits for it before reading this device's outputs.
    pub fn record(&self) -> Result<DeviceEvent> {
        let event =
            self.inner.stream.record_event(None).map_err(|e| self.error("cuEventRecord", e))?;
        Ok(DeviceEvent { event, device: self.device() })
    }

    /// A tensor of `meta` on this device whose memory holds stale values, for a writer that
    /// overwrites every element (a collective's output, a kernel of another crate).
    pub fn uninitialized(&self, meta: &TensorMeta) -> Result<Tensor> {
        super::kernels::output(self, meta)
    }

    /// The device address of a tensor of this device. It stays valid while the tensor lives;
    /// work that uses it must be ordered after this device's stream ([`CudaDevice::stream`]).
    pub fn pointer(&self, tensor: &Tensor) -> Result<u64> {
        if tensor.device() != self.device() {
            let reason = format!("the tensor is on {}", tensor.device());
            return Err(Error::Device { device: self.device().to_string(), reason });
        }
        super::kernels::pointer(tensor)
    }

    /// Counters of the caching allocator.
    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.inner.pool).stats()
    }

    /// Uninitialised device memory of `bytes` bytes from the caching allocator; it goes back to
    /// the allocator when the storage is dropped. Every caller writes all of it before reading.
    pub(super) fn storage(&self, bytes: usize) -> Result<CudaStorage> {
        let class = size_class(bytes);
        let cached = lock(&self.inner.pool).take(class);
        let buffer = match cached {
            Some(buffer) => buffer,
            None => self.allocate(class)?,
        };
        Ok(CudaStorage { buffer: Some(buffer), class, len: bytes, device: self.clone() })
    }

    fn allocate(&self, class: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised; see `storage`.
        match unsafe { self.inner.stream.alloc::<u8>(class) } {
            Ok(buffer) => Ok(buffer),
            Err(_) => {
                // Out of memory, perhaps because of cached buffers: free them and retry once.
                drop(lock(&self.inner.pool).drain());
                // SAFETY: as above.
                unsafe { self.inner.stream.alloc::<u8>(class) }
                    .map_err(|e| self.error("cuMemAlloc", e))
            }
        }
    }

    fn staging(&self, bytes: usize) -> Result<MutexGuard<'_, Option<PinnedHostSlice<u8>>>> {
        let mut staging = lock(&self.inner.staging);
        if staging.as_ref().is_none_or(|pinned| pinned.len() < bytes) {
            *staging = None;
            let size = size_class(bytes);
            // SAFETY: the pinned memory is uninitialised; it is only read after being written.
            let pinned = unsafe { self.inner.context.alloc_pinned_with_flags::<u8>(size, 0) }
                .map_err(|e| self.error("cuMemHostAlloc", e))?;
            *staging = Some(pinned);
        }
        Ok(staging)
    }

    /// The kernel `spec`, compiled for this device on first use (NVRTC to CUBIN, cached per
    /// process by spec and architecture) and loaded once per device. A hit hashes the spec: no
    /// source is generated.
    pub(super) fn function(&self, spec: Spec) -> Result<CudaFunction> {
        let mut functions = lock(&self.inner.functions);
        if let Some(function) = functions.get(&spec) {
            return Ok(function.clone());
        }
        let (entry, cubin) = cached_cubin(spec, self.inner.architecture)?;
        let module = self
            .inner
            .context
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| self.error("cuModuleLoadData", e))?;
        let function =
            module.load_function(&entry).map_err(|e| self.error("cuModuleGetFunction", e))?;
        functions.insert(spec, function.clone());
        Ok(function)
    }

    /// Launches the kernel whose arguments `args` holds with `shape` on the stream.
    pub(super) fn run(&self, mut args: LaunchArgs<'_>, shape: Launch) -> Result<()> {
        let config = LaunchConfig {
            grid_dim: (shape.grid, 1, 1),
            block_dim: (shape.block, 1, 1),
            shared_mem_bytes: shape.shared_bytes,
        };
        // SAFETY: each call site pushes the parameter list its generated source documents, and
        // every pointer refers to a live buffer of this device large enough for the launch.
        unsafe { args.launch(config) }.map(drop).map_err(|e| self.error("cuLaunchKernel", e))
    }

    /// A host copy of the device bytes of `storage` as a tensor of `meta`.
    fn download(&self, storage: &CudaStorage, meta: TensorMeta) -> Result<Tensor> {
        let mut host = CpuStorage::zeroed(storage.len);
        if storage.len > 0 {
            self.bind()?;
            let mut staging = self.staging(storage.len)?;
            let pinned = staging.as_mut().expect("staging was just sized");
            let buffer = pinned.as_mut_slice().map_err(|e| self.error("cuEventSynchronize", e))?;
            let target = &mut buffer[..storage.len];
            // SAFETY: the source holds `storage.len` bytes; the stream is synchronised before the
            // pinned buffer is read.
            unsafe { driver::memcpy_dtoh_async(target, storage.pointer(), self.cu_stream()) }
                .map_err(|e| self.error("cuMemcpyDtoHAsync", e))?;
            self.synchronize()?;
            host.bytes_mut().copy_from_slice(target);
        }
        Tensor::from_storage(meta, Arc::new(Storage::Cpu(host)))
    }

    pub(super) fn blas(&self) -> &CudaBlas {
        &self.inner.blas
    }

    /// cuBLASLt, when it exists and is enabled.
    pub(super) fn lt(&self) -> Option<&Lt> {
        self.inner.lt.as_ref().filter(|_| self.inner.lt_enabled.load(Ordering::Relaxed))
    }

    /// Whether products may go through cuBLASLt (the default) or all through
    /// `cublasGemmStridedBatchedEx`: for comparing the two paths on one device.
    pub fn set_cublaslt(&self, enabled: bool) {
        self.inner.lt_enabled.store(enabled, Ordering::Relaxed);
    }

    /// Counts a product by how cuBLASLt took it.
    pub(super) fn count_product(&self, issued: &lt::Issued) {
        let path = match issued {
            lt::Issued::Lt => 0,
            lt::Issued::NoPlan => 1,
            lt::Issued::Refused => 2,
        };
        self.inner.paths[path].fetch_add(1, Ordering::Relaxed);
    }

    /// The first product cuBLASLt refused on this device (its status and shape), if any.
    pub fn product_refusal(&self) -> Option<String> {
        self.lt().and_then(Lt::refusal).map(str::to_string)
    }

    /// How many products this device issued through each path.
    pub fn product_paths(&self) -> ProductPaths {
        let [lt, classic, refused] = self.inner.paths.each_ref().map(|n| n.load(Ordering::Relaxed));
        ProductPaths { lt, classic: classic + refused, refused }
    }

    pub(super) fn cu_stream(&self) -> cudarc::driver::sys::CUstream {
        self.inner.stream.cu_stream()
    }

    pub(super) fn error(&self, call: &str, error: DriverError) -> Error {
        libraries::driver_error(self.device(), call, error.0)
    }
}

/// Products a device issued through each cuBLAS path ([`CudaDevice::product_paths`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProductPaths {
    /// Through cuBLASLt with a cached plan.
    pub lt: u64,
    /// Through `cublasGemmStridedBatchedEx` (f64, no cuBLASLt algorithm for the shape, or
    /// refused by cuBLASLt).
    pub classic: u64,
    /// Of `classic`, those cuBLASLt refused at launch (their shapes stay classic afterwards).
    pub refused: u64,
}

/// An event recorded on a device's stream ([`CudaDevice::record`]).
#[derive(Debug)]
pub struct DeviceEvent {
    event: CudaEvent,
    device: Device,
}

impl DeviceEvent {
    /// True once the work before the event has finished.
    pub fn is_complete(&self) -> Result<bool> {
        self.event
            .try_is_complete()
            .map_err(|e| libraries::driver_error(self.device, "cuEventQuery", e.0))
    }

    /// Blocks until the work before the event has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.event
            .synchronize()
            .map_err(|e| libraries::driver_error(self.device, "cuEventSynchronize", e.0))
    }
}

/// GPU memory behind a tensor: a buffer of the caching allocator, `len` bytes of it in use.
pub struct CudaStorage {
    buffer: Option<CudaSlice<u8>>,
    class: usize,
    len: usize,
    device: CudaDevice,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({} bytes on {})", self.len, self.device())
    }
}

impl CudaStorage {
    /// The device the memory is on.
    pub fn device(&self) -> Device {
        self.device.device()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The error for reading this memory as host memory.
    pub fn not_on_host(&self) -> Error {
        Error::Device { device: self.device().to_string(), reason: super::not_on_host_reason() }
    }

    /// The device address of the first byte.
    pub(super) fn pointer(&self) -> u64 {
        let buffer = self.buffer.as_ref().expect("a live storage holds its buffer");
        let (pointer, _record) = buffer.device_ptr(&self.device.inner.stream);
        pointer
    }

    pub(super) fn to_host(&self, meta: TensorMeta) -> Result<Tensor> {
        self.device.download(self, meta)
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            // Stream order makes the reuse safe: later work on this stream runs after the last
            // use of the buffer. A full pool hands the buffer back and it is freed here.
            drop(lock(&self.device.inner.pool).give(self.class, buffer));
        }
    }
}

/// Compiled kernels by (architecture, spec), with their entry points: compiling is a pure
/// function of the spec and the architecture, so the process keeps each CUBIN once for all
/// devices of that architecture.
type CubinCache = Mutex<HashMap<((i32, i32), Spec), (Arc<str>, Arc<Vec<u8>>)>>;

fn cached_cubin(spec: Spec, architecture: (i32, i32)) -> Result<(Arc<str>, Arc<Vec<u8>>)> {
    static CUBINS: OnceLock<CubinCache> = OnceLock::new();
    let cache = CUBINS.get_or_init(CubinCache::default);
    if let Some(found) = lock(cache).get(&(architecture, spec)) {
        return Ok(found.clone());
    }
    let source = spec.source()?;
    let compiled =
        (Arc::from(source.entry.as_str()), Arc::new(compile_cubin(&source, architecture)?));
    lock(cache).insert((architecture, spec), compiled.clone());
    Ok(compiled)
}

/// Compiles `source` with NVRTC to a CUBIN for compute capability `architecture` (`sm_XY`: real
/// machine code, so the driver's PTX version does not matter). Needs only libnvrtc, no GPU.
pub fn compile_cubin(source: &KernelSource, architecture: (i32, i32)) -> Result<Vec<u8>> {
    let failed = |reason: String| Error::Device { device: "nvrtc".into(), reason };
    // SAFETY: only tries to open the library under its candidate names.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(failed("cannot load libnvrtc".into()));
    }
    let code = CString::new(source.code.as_str())
        .map_err(|_| failed(format!("{}: the source holds a NUL byte", source.entry)))?;
    let program = nvrtc::create_program(&code, None)
        .map_err(|e| failed(format!("{}: nvrtcCreateProgram: {e:?}", source.entry)))?;
    let options = [
        format!("--gpu-architecture=sm_{}{}", architecture.0, architecture.1),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `program` is a live program; it is destroyed once below.
    let result = unsafe { compile_program(program, &options, &source.entry) };
    // SAFETY: as above.
    let _ = unsafe { nvrtc::destroy_program(program) };
    result.map_err(failed)
}

/// Compiles a created program and reads its CUBIN (or its log, on failure).
unsafe fn compile_program(
    program: nvrtc_sys::nvrtcProgram,
    options: &[String],
    entry: &str,
) -> Result<Vec<u8>, String> {
    // SAFETY: the caller passes a live program.
    if let Err(error) = unsafe { nvrtc::compile_program(program, options) } {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(program) }.unwrap_or_default();
        let bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        let log = String::from_utf8_lossy(&bytes);
        return Err(format!("{entry}: {error:?}: {log}"));
    }
    let mut size = 0usize;
    // SAFETY: as above; `size` is a valid out-pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(program, &mut size) }
        .result()
        .map_err(|e| format!("{entry}: nvrtcGetCUBINSize: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("{entry}: nvrtcGetCUBIN: {e:?}"))?;
    Ok(cubin)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is one step: a panic elsewhere leaves them consistent.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
