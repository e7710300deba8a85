//! Modules: the layers of a GPT, built on the graph API. Tensor-parallel layouts are only SBP
//! choices on the parameters ([`Layouts`]): the compiler inserts whatever communication they
//! imply (Megatron's column- then row-parallel linear gives one all-reduce per MLP forward, and
//! one per attention forward, whose devices each compute their own heads).

mod gpt;

use meshflow_ops::{DType, TensorMeta};
use meshflow_placement::{NdSbp, Placement, Sbp};

use crate::graph::Init;
use crate::{Graph, Result, Tensor};

pub use gpt::{Gpt, GptConfig};

/// How a model lays out its tensors on a placement: which mesh axis (if any) is data parallel
/// and which is tensor parallel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layouts {
    /// The devices.
    pub placement: Placement,
    /// The mesh axis over which batches are split.
    pub data_axis: Option<usize>,
    /// The mesh axis over which weights are split (Megatron style).
    pub tensor_axis: Option<usize>,
}

impl Layouts {
    /// Everything on one device.
    pub fn single(placement: Placement) -> Self {
        Layouts { placement, data_axis: None, tensor_axis: None }
    }

    /// An nd-SBP that is `on_data` on the data axis, `on_tensor` on the tensor axis, B elsewhere.
    pub fn sbp(&self, on_data: Sbp, on_tensor: Sbp) -> NdSbp {
        NdSbp(
            (0..self.placement.mesh_axes())
                .map(|axis| {
                    if Some(axis) == self.data_axis {
                        on_data
                    } else if Some(axis) == self.tensor_axis {
                        on_tensor
                    } else {
                        Sbp::Broadcast
                    }
                })
                .collect(),
        )
    }

    /// A batch-major activation or input: split over the data axis, whole on the tensor axis.
    pub fn batch(&self) -> NdSbp {
        self.sbp(Sbp::Split(0), Sbp::Broadcast)
    }

    /// A parameter: replicated over the data axis, `on_tensor` on the tensor axis.
    pub fn weight(&self, on_tensor: Sbp) -> NdSbp {
        self.sbp(Sbp::Broadcast, on_tensor)
    }

    /// Devices along the tensor axis (1 without one).
    pub fn tensor_parallel(&self) -> usize {
        self.tensor_axis.map_or(1, |axis| self.placement.hierarchy()[axis])
    }
}

/// Weight initialisation of a model: normal(0, std) weights, seeded per parameter.
#[derive(Clone, Copy, Debug)]
pub struct WeightInit {
    /// Standard deviation of weights (GPT-2: 0.02).
    pub std: f64,
    /// Base seed; each parameter derives its own.
    pub seed: u64,
}

impl WeightInit {
    fn normal(&self, index: u64) -> Init {
        Init::Normal { mean: 0.0, std: self.std, seed: self.seed.wrapping_add(index) }
    }
}

/// `y = x·Wᵀ + b` with `W [out, in]` (PyTorch's layout).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

/// The activation a [`Linear`] layer applies in [`Linear::forward_act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x · sigmoid(x)`.
    Silu,
    /// GELU, exact (erf) or with the tanh approximation.
    Gelu {
        /// The tanh approximation.
        tanh: bool,
    },
}

/// How a [`Linear`] is split on the tensor-parallel axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallel {
    /// Whole on every device.
    None,
    /// Output features split (weight rows and bias): the output is split on its last axis.
    Column,
    /// Input features split (weight columns): the output is a partial sum.
    Row,
}

impl Linear {
    /// A linear layer named `name` (`name.weight`, `name.bias`).
    pub fn new(
        graph: &Graph,
        name: &str,
        (inputs, outputs): (usize, usize),
        bias: bool,
        parallel: Parallel,
        layouts: &Layouts,
        init: &mut InitCounter,
    ) -> Result<Self> {
        let (w_sbp, b_sbp) = match parallel {
            Parallel::None => (Sbp::Broadcast, Sbp::Broadcast),
            Parallel::Column => (Sbp::Split(0), Sbp::Split(0)),
            Parallel::Row => (Sbp::Split(1), Sbp::Broadcast),
        };
        let placement = &layouts.placement;
        let weight = graph.parameter_init(
            &format!("{name}.weight"),
            f32_meta(&[outputs, inputs]),
            init.normal(),
            placement,
            Some(layouts.weight(w_sbp)),
        )?;
        let bias = if bias {
            Some(graph.parameter_init(
                &format!("{name}.bias"),
                f32_meta(&[outputs]),
                Init::ZEROS,
                placement,
                Some(layouts.weight(b_sbp)),
            )?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `x [..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, self.weight.dtype())
    }

    /// Applies the layer with its product computed in `compute` (mixed precision: bf16 or f16
    /// operands with f32 accumulation, the weight stays an f32 master copy whose gradient comes
    /// back through the cast); the result and the bias add are in `x`'s dtype.
    pub fn forward_as(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let y = self.product_as(x, compute)?;
        match &self.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    /// `act(forward(x))`, the bias add and the activation in one op ([`Activation`]).
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_act_as(x, self.weight.dtype(), act)
    }

    /// `act(forward_as(x, compute))`, with the bias add and the activation in one op
    /// (`bias_gelu`, `bias_relu`, `bias_silu`, whose gradient also gives the bias gradient in
    /// one pass).
    pub fn forward_act_as(&self, x: &Tensor, compute: DType, act: Activation) -> Result<Tensor> {
        let y = self.product_as(x, compute)?;
        match (&self.bias, act) {
            (Some(b), Activation::Relu) => y.bias_relu(b),
            (Some(b), Activation::Silu) => y.bias_silu(b),
            (Some(b), Activation::Gelu { tanh }) => y.bias_gelu(b, tanh),
            (None, Activation::Relu) => y.relu(),
            (None, Activation::Silu) => y.silu(),
            (None, Activation::Gelu { tanh }) => y.gelu(tanh),
        }
    }

    /// `x · Wᵀ` computed in `compute`, in `x`'s dtype: the layer without its bias, for a
    /// junction that adds the bias itself ([`LayerNorm::forward_skip`]).
    pub fn product_as(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        if compute == x.dtype() && compute == self.weight.dtype() {
            x.matmul_t(&self.weight, false, true)
        } else {
            let weight = self.weight.cast(compute)?;
            x.cast(compute)?.matmul_t(&weight, false, true)?.cast(x.dtype())
        }
    }

    /// The layer cut into `parts` layers of equal output features, in order (a fused
    /// projection such as `c_attn`'s `[q | k | v]` seen as its pieces): the weight rows and
    /// the bias are split in the graph, so the pieces share the parameters (and their
    /// gradients add up into them), and each piece can be column-parallel on its own.
    pub fn split_outputs(&self, parts: usize) -> Result<Vec<Linear>> {
        let outputs = self.weight.dims()[0];
        if parts == 0 || !outputs.is_multiple_of(parts) {
            return Err(crate::Error::Graph(format!(
                "linear {}: {outputs} output features do not split into {parts} equal parts",
                self.weight.graph().data().label(self.weight.value())
            )));
        }
        let sizes = vec![outputs / parts; parts];
        let weights = self.weight.split(0, &sizes)?;
        let biases = match &self.bias {
            Some(bias) => bias.split(0, &sizes)?.into_iter().map(Some).collect(),
            None => vec![None; parts],
        };
        let pieces = weights.into_iter().zip(biases);
        Ok(pieces.map(|(weight, bias)| Linear { weight, bias }).collect())
    }
}

/// Layer normalisation over the last axis with weight and bias (eps 1e-5).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// `[d]`, initialised to ones.
    pub weight: Tensor,
    /// `[d]`, initialised to zeros.
    pub bias: Tensor,
}

impl LayerNorm {
    /// A layer norm named `name` over `d` features, replicated.
    pub fn new(graph: &Graph, name: &str, d: usize, layouts: &Layouts) -> Result<Self> {
        let sbp = Some(layouts.weight(Sbp::Broadcast));
        let p = &layouts.placement;
        let weight = graph.parameter_init(
            &format!("{name}.weight"),
            f32_meta(&[d]),
            Init::Full(1.0),
            p,
            sbp.clone(),
        )?;
        let bias =
            graph.parameter_init(&format!("{name}.bias"), f32_meta(&[d]), Init::ZEROS, p, sbp)?;
        Ok(LayerNorm { weight, bias })
    }

    /// Normalises `x [..., d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, 1e-5)
    }

    /// The residual junction before this norm in one op ([`Tensor::skip_layer_norm`]): the
    /// new residual stream `x + (y + bias)` and this norm of it.
    pub fn forward_skip(&self, x: &Tensor, y: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
        x.skip_layer_norm(y, bias, (&self.weight, &self.bias), 1e-5)
    }
}

/// Hands out per-parameter seeds in creation order, so a model built twice gets the same weights.
#[derive(Clone, Debug)]
pub struct InitCounter {
    init: WeightInit,
    next: u64,
}

impl InitCounter {
    /// Counts from the first parameter.
    pub fn new(init: WeightInit) -> Self {
        InitCounter { init, next: 0 }
    }

    fn normal(&mut self) -> Init {
        self.next += 1;
        self.init.normal(self.next)
    }
}

/// The logical meta of an f32 parameter.
pub(crate) fn f32_meta(dims: &[usize]) -> TensorMeta {
    TensorMeta::new(dims.to_vec(), DType::F32)
}
