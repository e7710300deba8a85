//! A decoder-only transformer with the parameter names and layouts of
//! `shared/formats/gpt-weights.md` (nanoGPT style): pre-norm LayerNorm, causal multi-head
//! self-attention with a fused `c_attn`, an MLP with exact GELU, learned positions and an untied
//! `lm_head` without bias.

use meshflow_ops::{DType, Tensor as HostTensor};
use meshflow_placement::Sbp;

use super::{f32_meta, Activation, InitCounter, LayerNorm, Layouts, Linear, Parallel, WeightInit};
use crate::{Error, Graph, Result, Tensor};

/// The shape of a GPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length (positions).
    pub ctx: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Model width.
    pub d_model: usize,
}

impl GptConfig {
    /// The JSON of the `config` metadata key of a weights file.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"vocab": {}, "ctx": {}, "n_layer": {}, "n_head": {}, "d_model": {}}}"#,
            self.vocab, self.ctx, self.n_layer, self.n_head, self.d_model
        )
    }

    /// Parameters of the model.
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        let block =
            2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d);
        self.vocab * d * 2 + self.ctx * d + self.n_layer * block + 2 * d
    }

    fn check(&self) -> Result<()> {
        if self.n_head == 0 || !self.d_model.is_multiple_of(self.n_head) {
            return Err(Error::Graph(format!(
                "gpt: d_model {} is not a multiple of n_head {}",
                self.d_model, self.n_head
            )));
        }
        if [self.vocab, self.ctx, self.n_layer, self.d_model].contains(&0) {
            return Err(Error::Graph(format!("gpt: every size must be positive: {self:?}")));
        }
        Ok(())
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// The model: its parameters live in the graph it was built on.
pub struct Gpt {
    config: GptConfig,
    /// The layouts of the pipeline stages (one for an unpipelined model).
    stages: Vec<Layouts>,
    /// The stage of each block.
    block_stage: Vec<usize>,
    /// The dtype of the matrix products (f32, or bf16/f16 for mixed precision).
    compute: DType,
    /// Recompute each block's forward in the backward instead of keeping its activations.
    checkpointing: bool,
    /// Dropout probability and base seed (probability 0: no dropout).
    dropout: (f64, u64),
    /// Attention through the fused `causal_attention` op when it applies (no attention dropout,
    /// f32 products); else through products, a mask and a softmax.
    fused_attention: bool,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

impl Gpt {
    /// Builds the parameters on `graph` with GPT-2's initialisation (normal 0.02, zero biases,
    /// unit LayerNorm weights), laid out by `layouts` (Megatron column/row splits on its tensor
    /// axis: each device of it computes whole attention heads and a slice of the MLP's hidden
    /// features; `c_attn` stays whole, in the layout of the weights file, and each device
    /// takes its heads' rows of q, k and v from it). The tensor axis must divide `n_head`.
    pub fn new(
        graph: &Graph,
        config: GptConfig,
        layouts: &Layouts,
        init: WeightInit,
    ) -> Result<Self> {
        Gpt::pipelined(graph, config, std::slice::from_ref(layouts), init)
    }

    /// Like [`Gpt::new`], as a pipeline over `stages` (each a placement with its own layouts):
    /// the blocks are spread evenly in order, the embeddings live on the first stage and the
    /// final norm and head on the last; activations cross stages with `to_placement`. The
    /// weights are the same as [`Gpt::new`]'s for the same `init`.
    pub fn pipelined(
        graph: &Graph,
        config: GptConfig,
        stages: &[Layouts],
        init: WeightInit,
    ) -> Result<Self> {
        config.check()?;
        for layouts in stages {
            check_heads(config.n_head, layouts)?;
        }
        if stages.is_empty() || stages.len() > config.n_layer {
            return Err(Error::Graph(format!(
                "gpt: {} pipeline stages for {} layers (need 1 to n_layer)",
                stages.len(),
                config.n_layer
            )));
        }
        let block_stage: Vec<usize> =
            (0..config.n_layer).map(|i| i * stages.len() / config.n_layer).collect();
        let d = config.d_model;
        let mut init = InitCounter::new(init);
        let layouts = &stages[0];
        let p = &layouts.placement;
        let wte = graph.parameter_init(
            "wte.weight",
            f32_meta(&[config.vocab, d]),
            init.normal(),
            p,
            Some(layouts.weight(Sbp::Broadcast)),
        )?;
        let wpe = graph.parameter_init(
            "wpe.weight",
            f32_meta(&[config.ctx, d]),
            init.normal(),
            p,
            Some(layouts.weight(Sbp::Broadcast)),
        )?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for (i, &stage) in block_stage.iter().enumerate() {
            let layouts = &stages[stage];
            let name = |part: &str| format!("h.{i}.{part}");
            blocks.push(Block {
                ln_1: LayerNorm::new(graph, &name("ln_1"), d, layouts)?,
                c_attn: Linear::new(
                    graph,
                    &name("attn.c_attn"),
                    (d, 3 * d),
                    true,
                    Parallel::None,
                    layouts,
                    &mut init,
                )?,
                attn_proj: Linear::new(
                    graph,
                    &name("attn.c_proj"),
                    (d, d),
                    true,
                    Parallel::Row,
                    layouts,
                    &mut init,
                )?,
                ln_2: LayerNorm::new(graph, &name("ln_2"), d, layouts)?,
                c_fc: Linear::new(
                    graph,
                    &name("mlp.c_fc"),
                    (d, 4 * d),
                    true,
                    Parallel::Column,
                    layouts,
                    &mut init,
                )?,
                mlp_proj: Linear::new(
                    graph,
                    &name("mlp.c_proj"),
                    (4 * d, d),
                    true,
                    Parallel::Row,
                    layouts,
                    &mut init,
                )?,
            });
        }
        let layouts = &stages[stages.len() - 1];
        let ln_f = LayerNorm::new(graph, "ln_f", d, layouts)?;
        let lm_head = Linear::new(
            graph,
            "lm_head",
            (d, config.vocab),
            false,
            Parallel::None,
            layouts,
            &mut init,
        )?;
        let stages = stages.to_vec();
        let (compute, checkpointing, dropout) = (DType::F32, false, (0.0, 0));
        Ok(Gpt {
            config,
            stages,
            block_stage,
            compute,
            checkpointing,
            dropout,
            fused_attention: true,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// The same model with activation checkpointing on each transformer block when `on`: the
    /// backward recomputes a block's forward instead of keeping its activations (only the
    /// residual stream between blocks stays alive), with the same gradients.
    pub fn with_activation_checkpointing(mut self, on: bool) -> Self {
        self.checkpointing = on;
        self
    }

    /// The same model with its matrix products in `dtype` (bf16 mixed precision: parameters,
    /// optimizer state, norms, softmax and the loss stay f32).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The same model with dropout of probability `p` (nanoGPT's places: on the embeddings, the
    /// attention weights, and each block's attention and MLP outputs), each place with its own
    /// seed derived from `seed`. Masks change at every training step and are the same on any
    /// mesh and with micro-batches ([`Tensor::dropout_per_step`]). `p = 0` (the default) adds
    /// nothing to the graph.
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Self {
        self.dropout = (p, seed);
        self
    }

    /// The same model with its attention computed by the fused `causal_attention` op when `on`
    /// (the default) and the model has no dropout and f32 products; else (and always with
    /// dropout, whose masks apply to the attention weights, or with bf16/f16 products, whose
    /// rounding points the op does not reproduce) by batched products, a masked softmax and
    /// permutations. Both give the same values within float rounding.
    pub fn with_fused_attention(mut self, on: bool) -> Self {
        self.fused_attention = on;
        self
    }

    /// True when the attention runs through the fused op (see [`Gpt::with_fused_attention`]).
    fn fused(&self) -> bool {
        self.fused_attention && self.dropout.0 == 0.0 && self.compute == DType::F32
    }

    /// The configuration.
    pub fn config(&self) -> GptConfig {
        self.config
    }

    /// Logits `[B, T, vocab]` of token ids `[B, T]` (i64, `T ≤ ctx`).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims();
        let [_, t] = dims[..] else {
            return Err(Error::Graph(format!("gpt: ids must be [batch, time], got {dims:?}")));
        };
        if t > self.config.ctx {
            return Err(Error::Graph(format!(
                "gpt: {t} positions exceed the context {}",
                self.config.ctx
            )));
        }
        let graph = ids.graph();
        let first = &self.stages[0].placement;
        let positions = HostTensor::from_vec((0..t as i64).collect::<Vec<_>>(), [t])?;
        let positions = graph.constant(&format!("positions.{t}"), positions, first)?;
        let masks = self.causal_masks(graph, t)?;
        let x = self.wte.embedding(ids)?.add(&self.wpe.embedding(&positions)?)?;
        let mut x = self.drop(&x, 0)?;
        // The next norm of `x` when the junction that made `x` computed it as well.
        let mut normed = None;
        for (index, &stage) in self.block_stage.iter().enumerate() {
            x = self.on_stage(&x, stage)?;
            let mask = masks.get(stage);
            (x, normed) = if self.checkpointing {
                graph.checkpoint(|| self.block(index, &x, normed.as_ref(), mask))?
            } else {
                self.block(index, &x, normed.as_ref(), mask)?
            };
        }
        let x = self.on_stage(&x, self.stages.len() - 1)?;
        let normed = match normed {
            Some(normed) => normed,
            None => self.ln_f.forward(&x)?,
        };
        self.lm_head.forward_as(&normed, self.compute)
    }

    /// The causal mask `[t, t]` (true above the diagonal) of each stage, for the attention
    /// without the fused op; none with it.
    fn causal_masks(&self, graph: &Graph, t: usize) -> Result<Vec<Tensor>> {
        if self.fused() {
            return Ok(Vec::new());
        }
        let mask: Vec<u8> = (0..t * t).map(|k| u8::from(k % t > k / t)).collect();
        let mask = HostTensor::from_bytes(&mask, [t, t], DType::Bool)?;
        let constant = |(stage, layouts): (usize, &Layouts)| {
            let name = format!("causal_mask.{t}.{stage}");
            graph.constant(&name, mask.clone(), &layouts.placement)
        };
        self.stages.iter().enumerate().map(constant).collect()
    }

    /// Transformer block `index` on the residual stream `x` (`mask`: for the attention without
    /// the fused op), with `ln_1(x)` when the junction before computed it. Returns the new
    /// stream and, when the block's last junction computed it too, the norm that comes next
    /// (`ln_1` of the next block, or `ln_f`): when that norm lives on this block's stage. With
    /// checkpointing both are the region's outputs, so that the program has the same ops (and
    /// the same layouts, and sums) with checkpointing as without.
    fn block(
        &self,
        index: usize,
        x: &Tensor,
        normed: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let block = &self.blocks[index];
        let h = match normed {
            Some(h) => h.clone(),
            None => block.ln_1.forward(x)?,
        };
        let y = self.attention(index, &h, mask)?;
        let (x, h) = self.junction(x, &y, &block.attn_proj, Some(&block.ln_2), 3 * index + 2)?;
        let h = h.ok_or_else(|| Error::Graph("gpt: the attention junction lost ln_2".into()))?;
        let gelu = Activation::Gelu { tanh: false };
        let h = block.c_fc.forward_act_as(&h, self.compute, gelu)?;
        let y = block.mlp_proj.product_as(&h, self.compute)?;
        let same_stage = |next: usize| self.block_stage.get(next) == Some(&self.block_stage[index]);
        let next = match index + 1 {
            next if next == self.blocks.len() => Some(&self.ln_f),
            next if same_stage(next) => Some(&self.blocks[next].ln_1),
            _ => None,
        };
        self.junction(&x, &y, &block.mlp_proj, next, 3 * index + 3)
    }

    /// The residual junction after a branch whose projection `proj` gave `product` (before its
    /// bias): the new stream `x + drop(product + bias)` and, with `next`, that norm of it. One
    /// `skip_layer_norm` when nothing comes between the bias and the add (no dropout); else the
    /// adds, the dropout (place `place`) and the norm one by one.
    fn junction(
        &self,
        x: &Tensor,
        product: &Tensor,
        proj: &Linear,
        next: Option<&LayerNorm>,
        place: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let (Some(bias), Some(norm), 0.0) = (&proj.bias, next, self.dropout.0) {
            let (x, normed) = norm.forward_skip(x, product, bias)?;
            return Ok((x, Some(normed)));
        }
        let y = match &proj.bias {
            Some(bias) => product.add(bias)?,
            None => product.clone(),
        };
        let x = x.add(&self.drop(&y, place)?)?;
        let normed = next.map(|norm| norm.forward(&x)).transpose()?;
        Ok((x, normed))
    }

    /// Dropout place `place` on `x` (itself without dropout).
    fn drop(&self, x: &Tensor, place: usize) -> Result<Tensor> {
        let (p, seed) = self.dropout;
        if p == 0.0 {
            return Ok(x.clone());
        }
        x.dropout_per_step(p, meshflow_ops::random::hash(seed, place as u64))
    }

    /// `x` moved to `stage`'s placement when it is not there yet.
    fn on_stage(&self, x: &Tensor, stage: usize) -> Result<Tensor> {
        let placement = &self.stages[stage].placement;
        if &x.placement() == placement {
            Ok(x.clone())
        } else {
            x.to_placement(placement, None)
        }
    }

    /// Mean cross-entropy of the next-token predictions for `ids [B, T]` against `targets [B, T]`.
    /// With a pipeline, `ids` live on the first stage and `targets` may live on either end.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let targets = self.on_stage(targets, self.stages.len() - 1)?;
        self.forward(ids)?.cross_entropy(&targets)
    }

    /// Causal self-attention of block `index` on `x [B, T, d]`: fused, or (with `mask`) composed.
    /// Returns `c_proj`'s product before its bias, which the junction after adds
    /// ([`Gpt::junction`]).
    ///
    /// With a tensor axis, `q`, `k` and `v` come from the three pieces of `c_attn` (its
    /// `[q | k | v]` rows), each a column-parallel product whose `[B, T, d]` output is split on
    /// the tensor axis by whole heads ([`Gpt::by_heads`]); they stay split through the head
    /// reshapes, the attention and the head merge, and the row-parallel `c_proj` turns them
    /// into a partial sum that boxing reduces, as in the MLP. Without one, `c_attn` is one
    /// product whose output is viewed as the packed `[B, T, 3, H, D]` (or split in three).
    fn attention(&self, index: usize, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let block = &self.blocks[index];
        let dims = x.dims();
        let (b, t, d) = (dims[0], dims[1], dims[2]);
        let (h, hd) = (self.config.n_head, d / self.config.n_head);
        let scale = 1.0 / (hd as f64).sqrt();
        let compute = self.compute;
        let Some(mask) = mask else {
            // `c_attn`'s products before their biases: the fused attention adds them.
            let pieces = self.qkv(index, x, false)?;
            let packed = |x: &Tensor| x.reshape([b, t, 1, h, hd]);
            let by_head = |bias: &Option<Tensor>, parts: usize| {
                bias.as_ref().map(|bias| bias.reshape([parts, h, hd])).transpose()
            };
            let (qkv, bias) = match &pieces[..] {
                [(q, bq), (k, bk), (v, bv)] => {
                    let qkv = Tensor::concat(&[&packed(q)?, &packed(k)?, &packed(v)?], 2)?;
                    let biases = [by_head(bq, 1)?, by_head(bk, 1)?, by_head(bv, 1)?];
                    let bias = match &biases {
                        [Some(bq), Some(bk), Some(bv)] => Some(Tensor::concat(&[bq, bk, bv], 0)?),
                        [None, None, None] => None,
                        _ => {
                            let reason = "gpt: c_attn's pieces disagree on having a bias";
                            return Err(Error::Graph(reason.into()));
                        }
                    };
                    (qkv, bias)
                }
                _ => (pieces[0].0.reshape([b, t, 3, h, hd])?, by_head(&pieces[0].1, 3)?),
            };
            let y = qkv.causal_attention(bias.as_ref(), scale)?;
            return block.attn_proj.product_as(&y.reshape([b, t, d])?, compute);
        };
        let pieces: Vec<Tensor> =
            self.qkv(index, x, true)?.into_iter().map(|(piece, _)| piece).collect();
        let pieces = if pieces.len() == 3 { pieces } else { pieces[0].split(2, &[d, d, d])? };
        let heads =
            |x: &Tensor| as_dtype(&x.reshape([b, t, h, hd])?.permute(&[0, 2, 1, 3])?, compute);
        let (q, k, v) = (heads(&pieces[0])?, heads(&pieces[1])?, heads(&pieces[2])?);
        let scores = as_dtype(&q.matmul_t(&k, false, true)?, DType::F32)?;
        let scores = scores.mul_scalar(scale)?;
        let weights = scores.masked_fill(mask, f64::NEG_INFINITY)?.softmax()?;
        let weights = as_dtype(&self.drop(&weights, 3 * index + 1)?, compute)?;
        let y = as_dtype(&weights.matmul(&v)?, DType::F32)?;
        let y = y.permute(&[0, 2, 1, 3])?.reshape([b, t, d])?;
        block.attn_proj.product_as(&y, compute)
    }

    /// The `c_attn` projection of `x [B, T, d]` in block `index`: `[q, k, v]` (each `[B, T, d]`,
    /// split by heads) on a stage with a tensor axis, where `x` is whole on the tensor axis
    /// (Megatron's replicated input of a column-parallel product), else `[qkv]` (`[B, T, 3d]`,
    /// one product). Each with its bias added (`biased`), or the product alone with its bias
    /// beside it, for the fused attention to add.
    fn qkv(&self, index: usize, x: &Tensor, biased: bool) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        let c_attn = &self.blocks[index].c_attn;
        let project = |layer: &Linear, x: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
            if biased {
                Ok((layer.forward_as(x, self.compute)?, None))
            } else {
                Ok((layer.product_as(x, self.compute)?, layer.bias.clone()))
            }
        };
        if self.stages[self.block_stage[index]].tensor_axis.is_none() {
            return Ok(vec![project(c_attn, x)?]);
        }
        let x = x.to_sbp(self.stages[self.block_stage[index]].batch())?;
        let piece = |layer: &Linear| -> Result<(Tensor, Option<Tensor>)> {
            let (y, bias) = project(layer, &x)?;
            Ok((self.by_heads(index, &y)?, bias))
        };
        c_attn.split_outputs(3)?.iter().map(piece).collect()
    }

    /// `x [B, T, d]` (q, k or v) split by whole heads on the tensor axis of block `index`'s
    /// stage and by batch on its data axis: Megatron's layout of the attention, pinned as an SBP
    /// choice (the signature selection would otherwise be free to split the attention by batch
    /// on the tensor axis, gathering the weights' gradients instead). [`check_heads`] made sure
    /// that the devices divide the heads.
    fn by_heads(&self, index: usize, x: &Tensor) -> Result<Tensor> {
        let layouts = &self.stages[self.block_stage[index]];
        x.to_sbp(layouts.sbp(Sbp::Split(0), Sbp::Split(2)))
    }
}

/// An error unless the tensor axis of `layouts` divides the `heads`: tensor-parallel attention
/// gives each device whole heads.
fn check_heads(heads: usize, layouts: &Layouts) -> Result<()> {
    let devices = layouts.tensor_parallel();
    match (heads % devices, layouts.tensor_axis) {
        (0, _) | (_, None) => Ok(()),
        (_, Some(axis)) => Err(Error::Graph(format!(
            "gpt attention (causal_attention over the heads of c_attn): {heads} heads do not \
             split over the {devices} devices of tensor axis {axis} of {}: each device must \
             hold whole heads, so n_head must be a multiple of the tensor-parallel size",
            layouts.placement
        ))),
    }
}

/// `x` in `dtype` (itself when it already is).
fn as_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x.clone())
    } else {
        x.cast(dtype)
    }
}
