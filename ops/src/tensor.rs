//! Tensors: a shape, a dtype and contiguous row-major storage shared by reference counting.

use std::sync::Arc;

use crate::buffers::BufferPool;
use crate::{Context, DType, Device, Element, Error, Result, Shape};

/// What inference works on: the shape and dtype of a tensor, without data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    /// The dimensions.
    pub shape: Shape,
    /// The element type.
    pub dtype: DType,
}

impl TensorMeta {
    /// A meta from a shape and dtype.
    pub fn new(shape: impl Into<Shape>, dtype: DType) -> Self {
        TensorMeta { shape: shape.into(), dtype }
    }

    /// Bytes the tensor occupies.
    pub fn bytes(&self) -> usize {
        self.shape.numel() * self.dtype.size()
    }
}

/// Host storage: bytes in a buffer aligned to 8, so any [`Element`] slice can view it. Storage
/// taken from a [`BufferPool`] goes back to it when dropped; a copy of it (copy on write) is
/// taken from the same pool, so the pool only ever gets back what it handed out.
#[derive(Debug)]
pub struct CpuStorage {
    words: Vec<u64>,
    len: usize,
    home: Option<Arc<BufferPool>>,
}

impl CpuStorage {
    /// Zeroed storage of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        CpuStorage { words: vec![0; len.div_ceil(8)], len, home: None }
    }

    /// Storage of `len` bytes from `pool`, holding stale values: for a writer that overwrites
    /// every byte. It returns to `pool` when dropped.
    pub fn for_overwrite(len: usize, pool: &Arc<BufferPool>) -> Self {
        CpuStorage { words: pool.take(len.div_ceil(8)), len, home: Some(pool.clone()) }
    }

    /// Storage holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut storage = Self::zeroed(bytes.len());
        storage.bytes_mut().copy_from_slice(bytes);
        storage
    }

    /// Storage holding the elements of `data`.
    pub fn from_slice<T: Element>(data: &[T]) -> Self {
        Self::from_bytes(bytemuck::cast_slice(data))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Clone for CpuStorage {
    fn clone(&self) -> Self {
        match &self.home {
            Some(pool) => {
                let mut words = pool.take(self.words.len());
                words.copy_from_slice(&self.words);
                CpuStorage { words, len: self.len, home: Some(pool.clone()) }
            }
            None => CpuStorage { words: self.words.clone(), len: self.len, home: None },
        }
    }
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.give(std::mem::take(&mut self.words));
        }
    }
}

/// The memory behind a tensor.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// GPU memory, made by [`crate::cuda`] (never exists in a build without the `cuda` feature).
    Cuda(crate::cuda::CudaStorage),
}

impl Storage {
    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(gpu) => gpu.device(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(cpu) => cpu.len(),
            Storage::Cuda(gpu) => gpu.len(),
        }
    }

    /// True when it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A contiguous, row-major tensor. Cloning is cheap: the storage is shared.
#[derive(Clone, Debug)]
pub struct Tensor {
    meta: TensorMeta,
    storage: Arc<Storage>,
}

impl Tensor {
    /// A tensor over existing storage; the storage must hold exactly `meta.bytes()` bytes.
    pub fn from_storage(meta: TensorMeta, storage: Arc<Storage>) -> Result<Self> {
        if storage.len() != meta.bytes() {
            return Err(Error::DataLength {
                len: storage.len() / meta.dtype.size().max(1),
                shape: meta.shape.clone(),
                numel: meta.shape.numel(),
            });
        }
        Ok(Tensor { meta, storage })
    }

    /// A host tensor holding `data` in the given shape.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_slice(&data, shape)
    }

    /// A host tensor holding a copy of `data` in the given shape.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::DataLength {
                len: data.len(),
                shape: shape.clone(),
                numel: shape.numel(),
            });
        }
        let storage = Storage::Cpu(CpuStorage::from_slice(data));
        Ok(Tensor { meta: TensorMeta::new(shape, T::DTYPE), storage: Arc::new(storage) })
    }

    /// A host tensor of the given bytes, interpreted as `dtype` elements in `shape`.
    pub fn from_bytes(bytes: &[u8], shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        let meta = TensorMeta::new(shape, dtype);
        let storage = Arc::new(Storage::Cpu(CpuStorage::from_bytes(bytes)));
        Self::from_storage(meta, storage)
    }

    /// A zero-filled host tensor.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Self {
        let meta = TensorMeta::new(shape, dtype);
        let storage = Storage::Cpu(CpuStorage::zeroed(meta.bytes()));
        Tensor { meta, storage: Arc::new(storage) }
    }

    /// A host tensor for a kernel that writes every element: its storage comes from the
    /// context's [`BufferPool`] and holds stale values until then (never uninitialised memory).
    pub fn for_overwrite(ctx: &Context, shape: impl Into<Shape>, dtype: DType) -> Self {
        let meta = TensorMeta::new(shape, dtype);
        let storage = Storage::Cpu(CpuStorage::for_overwrite(meta.bytes(), ctx.buffers()));
        Tensor { meta, storage: Arc::new(storage) }
    }

    /// The shape and dtype.
    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.meta.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.meta.shape.dims()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.meta.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.meta.shape.numel()
    }

    /// The device of the storage.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The shared storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The raw bytes of a host tensor.
    pub fn bytes(&self) -> Result<&[u8]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(cpu.bytes()),
            Storage::Cuda(gpu) => Err(gpu.not_on_host()),
        }
    }

    /// A typed view of a host tensor; `u8` also views `bool` tensors.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_view::<T>()?;
        Ok(bytemuck::cast_slice(self.bytes()?))
    }

    /// The elements, copied into a `Vec`.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// A writable typed view; copies the storage first when it is shared (copy on write).
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_view::<T>()?;
        Ok(bytemuck::cast_slice_mut(host_unique(&mut self.storage)?.bytes_mut()))
    }

    /// The raw bytes, writable whatever the dtype; copies the storage first when it is shared.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        Ok(host_unique(&mut self.storage)?.bytes_mut())
    }

    /// True when this tensor holds the only reference to its host storage: writing it through
    /// [`Tensor::as_mut_slice`] then updates it in place, with no copy. (Nothing else can take
    /// a reference meanwhile: that needs this tensor.)
    pub fn is_unique(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
            && Arc::weak_count(&self.storage) == 0
            && matches!(*self.storage, Storage::Cpu(_))
    }

    /// Storage for an output of `meta` that a kernel overwrites element by element: this
    /// tensor's own when it holds the only reference to host storage of `meta.bytes()` bytes
    /// (`true`: it keeps its values until overwritten, so the kernel may read each element
    /// before writing it), else fresh storage from `ctx`'s pool as [`Tensor::for_overwrite`]
    /// gives (`false`: the kernel reads its input elsewhere).
    pub fn into_unique_or_overwrite(self, ctx: &Context, meta: TensorMeta) -> (Tensor, bool) {
        if self.is_unique() && self.storage.len() == meta.bytes() {
            return (Tensor { meta, storage: self.storage }, true);
        }
        (Tensor::for_overwrite(ctx, meta.shape, meta.dtype), false)
    }

    /// The same storage under another shape with the same number of elements.
    pub fn reshaped(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape("reshape", &[self.shape(), &shape], "element counts differ"));
        }
        Ok(Tensor { meta: TensorMeta::new(shape, self.dtype()), storage: self.storage.clone() })
    }

    fn check_view<T: Element>(&self) -> Result<()> {
        let ok = T::DTYPE == self.dtype() || (T::DTYPE == DType::U8 && self.dtype() == DType::Bool);
        if ok {
            Ok(())
        } else {
            Err(Error::ViewDType { requested: T::DTYPE, actual: self.dtype() })
        }
    }
}

/// Copy-on-write: the host storage, copied first when another tensor shares it.
fn host_unique(storage: &mut Arc<Storage>) -> Result<&mut CpuStorage> {
    if Arc::get_mut(storage).is_none() {
        let copy = match &**storage {
            Storage::Cpu(cpu) => Storage::Cpu(cpu.clone()),
            Storage::Cuda(gpu) => return Err(gpu.not_on_host()),
        };
        *storage = Arc::new(copy);
    }
    match Arc::get_mut(storage).expect("storage was just made unique") {
        Storage::Cpu(cpu) => Ok(cpu),
        Storage::Cuda(gpu) => Err(gpu.not_on_host()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(t: &Tensor) -> usize {
        t.bytes().expect("host").as_ptr() as usize
    }

    #[test]
    fn a_unique_tensor_lends_its_storage_to_an_output_of_its_size() {
        let ctx = Context::single_thread();
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]).expect("tensor");
        assert!(t.is_unique());
        let at = address(&t);
        let (out, reused) = t.into_unique_or_overwrite(&ctx, TensorMeta::new([4], DType::I32));
        assert!(reused);
        assert_eq!((address(&out), out.dims(), out.dtype()), (at, &[4][..], DType::I32));
        assert_eq!(out.to_vec::<i32>().expect("i32")[1], 2.0f32.to_bits() as i32);
    }

    #[test]
    fn a_shared_or_resized_tensor_gets_fresh_storage() {
        let ctx = Context::single_thread();
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [4]).expect("tensor");
        let view = t.reshaped([2, 2]).expect("view");
        assert!(!t.is_unique() && !view.is_unique());
        let (out, reused) = view.into_unique_or_overwrite(&ctx, TensorMeta::new([4], DType::F32));
        assert!(!reused);
        assert_ne!(address(&out), address(&t));
        assert_eq!(t.to_vec::<f32>().expect("f32"), [1.0, 2.0, 3.0, 4.0]);
        let (out, reused) = t.into_unique_or_overwrite(&ctx, TensorMeta::new([2], DType::F32));
        assert!(!reused);
        assert_eq!(out.dims(), &[2]);
    }
}
