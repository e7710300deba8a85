//! Data movement on host tensors that boxing needs: moving an axis to the front and back,
//! taking and writing boxes (regions), concatenating. Byte-level, so one routine serves every
//! dtype.

use meshflow_ops::{Shape, Tensor};

use crate::{Error, Result};

/// The tensor with axis `axis` moved to position 0 (the others keep their order).
pub fn axis_to_front(t: &Tensor, axis: usize) -> Result<Tensor> {
    if axis == 0 {
        return Ok(t.clone());
    }
    let dims = t.dims();
    let (outer, len, inner) = t.shape().split_at_axis(axis);
    let mut out_dims = vec![len];
    out_dims.extend(dims.iter().enumerate().filter(|(i, _)| *i != axis).map(|(_, d)| *d));
    swap_blocks(t, (outer, len, inner), out_dims, true)
}

/// The inverse of [`axis_to_front`]: axis 0 of `t` goes back to position `axis`.
pub fn axis_from_front(t: &Tensor, axis: usize) -> Result<Tensor> {
    if axis == 0 {
        return Ok(t.clone());
    }
    let dims = t.dims();
    let (len, rest) = (dims[0], &dims[1..]);
    let outer: usize = rest[..axis].iter().product();
    let inner: usize = rest[axis..].iter().product();
    let mut out_dims = rest[..axis].to_vec();
    out_dims.push(len);
    out_dims.extend_from_slice(&rest[axis..]);
    swap_blocks(t, (outer, len, inner), out_dims, false)
}

/// Moves blocks of `inner` elements between the layouts `[outer, len, inner]` and
/// `[len, outer, inner]` (`to_front`: from the first to the second).
fn swap_blocks(
    t: &Tensor,
    (outer, len, inner): (usize, usize, usize),
    out_dims: Vec<usize>,
    to_front: bool,
) -> Result<Tensor> {
    let block = inner * t.dtype().size();
    let src = t.bytes()?;
    let mut out = vec![0u8; src.len()];
    for a in 0..len {
        for o in 0..outer {
            let (middle, front) = ((o * len + a) * block, (a * outer + o) * block);
            let (from, to) = if to_front { (middle, front) } else { (front, middle) };
            out[to..to + block].copy_from_slice(&src[from..from + block]);
        }
    }
    Ok(Tensor::from_bytes(&out, out_dims, t.dtype())?)
}

/// The box of `t` starting at `offsets` with shape `shape` (coordinates relative to `t`).
pub fn take_box(t: &Tensor, offsets: &[usize], shape: &[usize]) -> Result<Tensor> {
    check_box("take_box", t.dims(), offsets, shape)?;
    let size = t.dtype().size();
    let mut out = vec![0u8; shape.iter().product::<usize>() * size];
    copy_box(t.bytes()?, t.dims(), offsets, &mut out, shape, &vec![0; shape.len()], shape, size);
    Ok(Tensor::from_bytes(&out, shape.to_vec(), t.dtype())?)
}

/// Writes `src` into `dst` at `offsets` (coordinates relative to `dst`).
pub fn put_box(dst: &mut Tensor, offsets: &[usize], src: &Tensor) -> Result<()> {
    check_box("put_box", dst.dims(), offsets, src.dims())?;
    if src.dtype() != dst.dtype() {
        return Err(Error::Graph(format!("put_box: {} into {}", src.dtype(), dst.dtype())));
    }
    let size = dst.dtype().size();
    let dims = dst.dims().to_vec();
    let shape = src.dims();
    let zero = vec![0; shape.len()];
    copy_box(src.bytes()?, shape, &zero, dst.bytes_mut()?, &dims, offsets, shape, size);
    Ok(())
}

/// Concatenation along `axis` (all other dimensions equal).
pub fn concat(parts: &[Tensor], axis: usize) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| Error::Graph("concat of no tensors".into()))?;
    let mut dims = first.dims().to_vec();
    dims[axis] = parts.iter().map(|p| p.dims()[axis]).sum();
    let size = first.dtype().size();
    let mut out = vec![0u8; dims.iter().product::<usize>() * size];
    let mut offsets = vec![0; dims.len()];
    for part in parts {
        let shape = part.dims();
        let fits = shape.len() == dims.len()
            && shape.iter().zip(&dims).enumerate().all(|(i, (a, b))| i == axis || a == b);
        if !fits || part.dtype() != first.dtype() {
            return Err(Error::Graph(format!(
                "concat along {axis}: part {:?} {} does not match {:?} {}",
                shape,
                part.dtype(),
                first.dims(),
                first.dtype()
            )));
        }
        let zero = vec![0; shape.len()];
        copy_box(part.bytes()?, shape, &zero, &mut out, &dims, &offsets, shape, size);
        offsets[axis] += shape[axis];
    }
    Ok(Tensor::from_bytes(&out, Shape::new(dims), first.dtype())?)
}

fn check_box(what: &str, dims: &[usize], offsets: &[usize], shape: &[usize]) -> Result<()> {
    let fits = dims.len() == offsets.len()
        && dims.len() == shape.len()
        && dims.iter().zip(offsets).zip(shape).all(|((d, o), s)| o + s <= *d);
    if fits {
        Ok(())
    } else {
        Err(Error::Graph(format!(
            "{what}: box at {offsets:?} of shape {shape:?} does not fit a tensor of shape {dims:?}"
        )))
    }
}

/// Copies the box `shape` from `src` (dims `src_dims`, box at `src_at`) to `dst` (dims
/// `dst_dims`, box at `dst_at`), element size `size` bytes.
#[allow(clippy::too_many_arguments)]
fn copy_box(
    src: &[u8],
    src_dims: &[usize],
    src_at: &[usize],
    dst: &mut [u8],
    dst_dims: &[usize],
    dst_at: &[usize],
    shape: &[usize],
    size: usize,
) {
    let rank = shape.len();
    if shape.iter().product::<usize>() == 0 {
        return;
    }
    if rank == 0 {
        dst[..size].copy_from_slice(&src[..size]);
        return;
    }
    let strides = |dims: &[usize]| {
        let mut s = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_dims), strides(dst_dims));
    let row = shape[rank - 1] * size;
    let rows: usize = shape[..rank - 1].iter().product();
    let mut index = vec![0; rank - 1];
    for _ in 0..rows {
        let mut s = src_at[rank - 1];
        let mut d = dst_at[rank - 1];
        for k in 0..rank - 1 {
            s += (src_at[k] + index[k]) * ss[k];
            d += (dst_at[k] + index[k]) * ds[k];
        }
        dst[d * size..d * size + row].copy_from_slice(&src[s * size..s * size + row]);
        for k in (0..rank - 1).rev() {
            index[k] += 1;
            if index[k] < shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::from_vec((0..n).map(|v| v as f32).collect(), dims.to_vec()).unwrap()
    }

    #[test]
    fn axis_round_trip_and_values() {
        let t = iota(&[2, 3, 4]);
        let f = axis_to_front(&t, 1).unwrap();
        assert_eq!(f.dims(), &[3, 2, 4]);
        // f[a, o, i] = t[o, a, i]
        let v = f.to_vec::<f32>().unwrap();
        assert_eq!(v[(2 * 2 + 1) * 4 + 3], ((3 + 2) * 4 + 3) as f32);
        let back = axis_from_front(&f, 1).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
    }

    #[test]
    fn boxes_take_put_and_concat() {
        let t = iota(&[4, 5]);
        let b = take_box(&t, &[1, 2], &[2, 3]).unwrap();
        assert_eq!(b.to_vec::<f32>().unwrap(), vec![7.0, 8.0, 9.0, 12.0, 13.0, 14.0]);
        let mut z = Tensor::zeros([4, 5], meshflow_ops::DType::F32);
        put_box(&mut z, &[1, 2], &b).unwrap();
        assert_eq!(
            take_box(&z, &[1, 2], &[2, 3]).unwrap().to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap()
        );
        assert_eq!(z.to_vec::<f32>().unwrap()[0], 0.0);
        let halves =
            [take_box(&t, &[0, 0], &[4, 2]).unwrap(), take_box(&t, &[0, 2], &[4, 3]).unwrap()];
        assert_eq!(
            concat(&halves, 1).unwrap().to_vec::<f32>().unwrap(),
            t.to_vec::<f32>().unwrap()
        );
        assert!(take_box(&t, &[3, 0], &[2, 5]).is_err());
    }
}
