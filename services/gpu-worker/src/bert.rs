//! The BERT sentence-embedding encoder (the all-MiniLM-L6-v2 architecture)
//! on candle-core tensor ops: embeddings and LayerNorm, post-LN encoder
//! layers (multi-head self-attention, GELU feed-forward), mean pooling over
//! the attention mask, L2 normalisation. Weights carry HuggingFace's
//! `BertModel` names (see [`crate::spec`]).
//!
//! LayerNorm, the attention softmax and the pooling are computed in F32
//! whatever the compute dtype (F16/BF16 on CUDA), as is usual for half
//! precision inference.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use crate::spec::BertSpec;
use crate::weights::Error;

/// Additive attention bias of a masked key: its softmax weight is exactly 0
/// in F32 (finite, so a row with no key at all stays finite too).
const MASKED: f64 = -1e9;

/// A linear layer, weight kept transposed (`[in, out]`).
struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `x`: `[rows, in]` -> `[rows, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

/// LayerNorm over the last dimension, computed in F32.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&variance.affine(1.0, self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

struct EncoderLayer {
    /// Query, key and value fused: `[hidden, 3 * hidden]`.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A loaded encoder on its device.
pub struct BertEncoder {
    word: Tensor,
    position: Tensor,
    /// Row 0 of the token-type embeddings, `[1, hidden]`: every token is of
    /// type 0 (single-sentence encoders).
    token_type: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    normalize: bool,
    dtype: DType,
    device: Device,
}

/// Token ids and attention mask of a batch, `rows x len`, row-major.
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub rows: usize,
    pub len: usize,
}

/// Weights read from a safetensors file, taken one by one with their shape
/// checked.
struct Weights {
    tensors: HashMap<String, Tensor>,
    prefix: &'static str,
    dtype: DType,
    device: Device,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, Error> {
        let key = format!("{}{name}", self.prefix);
        let Some(tensor) = self.tensors.remove(&key) else {
            return Err(Error::Missing {
                name: key,
                shape: shape.to_vec(),
            });
        };
        if !matches!(tensor.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::NotFloat {
                name: key,
                dtype: tensor.dtype(),
            });
        }
        if tensor.dims() != shape {
            return Err(Error::Shape {
                name: key,
                shape: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// A tensor in the compute dtype on the device.
    fn placed(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, Error> {
        let tensor = self.take(name, shape)?;
        tensor
            .to_dtype(self.dtype)
            .and_then(|tensor| tensor.to_device(&self.device))
            .map_err(|source| Error::Place {
                name: name.to_owned(),
                source,
            })
    }

    fn linear(&mut self, name: &str, input: usize, output: usize) -> Result<Linear, Error> {
        let weight = self.take(&format!("{name}.weight"), &[output, input])?;
        let weight_t = weight
            .t()
            .and_then(|weight| weight.contiguous())
            .and_then(|weight| weight.to_dtype(self.dtype))
            .and_then(|weight| weight.to_device(&self.device))
            .map_err(|source| Error::Place {
                name: format!("{name}.weight"),
                source,
            })?;
        let bias = self.placed(&format!("{name}.bias"), &[output])?;
        Ok(Linear { weight_t, bias })
    }

    /// Query, key and value of one layer as one `[hidden, 3 * hidden]`
    /// linear layer.
    fn fused_qkv(&mut self, name: &str, hidden: usize) -> Result<Linear, Error> {
        let parts = ["query", "key", "value"]
            .map(|part| self.linear(&format!("{name}.{part}"), hidden, hidden));
        let [query, key, value] = parts;
        let (query, key, value) = (query?, key?, value?);
        let fuse = |source: candle_core::Error| Error::Fuse {
            name: name.to_owned(),
            source,
        };
        let weight_t =
            Tensor::cat(&[&query.weight_t, &key.weight_t, &value.weight_t], 1).map_err(fuse)?;
        let bias = Tensor::cat(&[&query.bias, &key.bias, &value.bias], 0).map_err(fuse)?;
        Ok(Linear { weight_t, bias })
    }

    /// LayerNorm parameters stay F32.
    fn layer_norm(&mut self, name: &str, hidden: usize, eps: f64) -> Result<LayerNorm, Error> {
        let mut take = |part: &str| {
            self.take(&format!("{name}.{part}"), &[hidden])?
                .to_dtype(DType::F32)
                .and_then(|tensor| tensor.to_device(&self.device))
                .map_err(|source| Error::Place {
                    name: format!("{name}.{part}"),
                    source,
                })
        };
        Ok(LayerNorm {
            weight: take("weight")?,
            bias: take("bias")?,
            eps,
        })
    }

    /// Fails on tensors nothing took, except those a real checkpoint holds
    /// that the encoder does not use (the pooler head, the position-ids
    /// buffer).
    fn finish(self, file: &Path) -> Result<(), Error> {
        let prefix = self.prefix;
        let unexpected: BTreeSet<String> = self
            .tensors
            .into_keys()
            .filter(|name| {
                let name = name.strip_prefix(prefix).unwrap_or(name);
                !(name.starts_with("pooler.") || name == "embeddings.position_ids")
            })
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::Unused {
                path: file.to_owned(),
                names: unexpected,
            });
        }
        Ok(())
    }
}

impl BertEncoder {
    /// Loads the weights of `spec` from a safetensors file onto `device` in
    /// `dtype`, checking every tensor's presence and shape.
    pub fn load(
        spec: &BertSpec,
        weights: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<BertEncoder, Error> {
        // Read on the CPU first: a malformed file is reported before
        // anything reaches the GPU.
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(weights, &Device::Cpu).map_err(|source| {
                Error::Read {
                    path: weights.to_owned(),
                    source,
                }
            })?;
        // BertForMaskedLM and friends prefix the encoder's names.
        let prefix = if !tensors.contains_key("embeddings.word_embeddings.weight")
            && tensors.contains_key("bert.embeddings.word_embeddings.weight")
        {
            "bert."
        } else {
            ""
        };
        let mut weights_file = Weights {
            tensors,
            prefix,
            dtype,
            device: device.clone(),
        };
        let w = &mut weights_file;
        let hidden = spec.hidden;
        let eps = spec.layer_norm_eps;
        let word = w.placed(
            "embeddings.word_embeddings.weight",
            &[spec.vocab_size, hidden],
        )?;
        let position = w.placed(
            "embeddings.position_embeddings.weight",
            &[spec.max_position, hidden],
        )?;
        let token_type = w
            .placed(
                "embeddings.token_type_embeddings.weight",
                &[spec.type_vocab_size, hidden],
            )?
            .narrow(0, 0, 1)
            .and_then(|row| row.contiguous())
            .map_err(Error::TokenTypeEmbeddings)?;
        let embeddings_norm = w.layer_norm("embeddings.LayerNorm", hidden, eps)?;
        let mut layers = Vec::with_capacity(spec.layers);
        for index in 0..spec.layers {
            let name = format!("encoder.layer.{index}");
            layers.push(EncoderLayer {
                qkv: w.fused_qkv(&format!("{name}.attention.self"), hidden)?,
                attention_output: w.linear(
                    &format!("{name}.attention.output.dense"),
                    hidden,
                    hidden,
                )?,
                attention_norm: w.layer_norm(
                    &format!("{name}.attention.output.LayerNorm"),
                    hidden,
                    eps,
                )?,
                intermediate: w.linear(
                    &format!("{name}.intermediate.dense"),
                    hidden,
                    spec.intermediate,
                )?,
                output: w.linear(&format!("{name}.output.dense"), spec.intermediate, hidden)?,
                output_norm: w.layer_norm(&format!("{name}.output.LayerNorm"), hidden, eps)?,
            });
        }
        weights_file.finish(weights)?;
        Ok(BertEncoder {
            word,
            position,
            token_type,
            embeddings_norm,
            layers,
            heads: spec.heads,
            head_dim: spec.head_dim(),
            hidden,
            normalize: spec.normalize,
            dtype,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Width of an embedding.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Embeds a batch: `rows * hidden` F32 values. Ids must be within the
    /// vocabulary and `len` within the position table (the caller checks);
    /// the mask holds 0 or 1.
    pub fn forward(&self, batch: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        let (rows, len, hidden) = (batch.rows, batch.len, self.hidden);
        let ids = Tensor::from_slice(&batch.ids, rows * len, &self.device)?;
        let mask = Tensor::from_slice(&batch.mask, (rows, len), &self.device)?;
        let embedded = self
            .word
            .index_select(&ids, 0)?
            .reshape((rows, len, hidden))?
            .broadcast_add(&self.position.narrow(0, 0, len)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = self
            .embeddings_norm
            .forward(&embedded)?
            .reshape((rows * len, hidden))?;
        // 0 where the mask is 1, MASKED where it is 0; one row per sequence,
        // broadcast over heads and queries.
        let bias = mask.affine(-MASKED, MASKED)?.reshape((rows, 1, 1, len))?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias, rows, len)?;
        }
        // Mean over the tokens the mask keeps.
        let states = x.to_dtype(DType::F32)?.reshape((rows, len, hidden))?;
        let summed = states.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.maximum(1e-9)?;
        let mut pooled = summed.broadcast_div(&counts)?;
        if self.normalize {
            let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
            pooled = pooled.broadcast_div(&norms)?;
        }
        pooled.flatten_all()?.to_vec1::<f32>()
    }

    /// One post-LN encoder layer on `[rows * len, hidden]` states.
    fn layer(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        bias: &Tensor,
        rows: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let (hidden, heads, head_dim) = (self.hidden, self.heads, self.head_dim);
        let qkv = layer.qkv.forward(x)?;
        // [rows, heads, len, head_dim]
        let split = |index: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(1, index * hidden, hidden)?
                .reshape((rows, len, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (query, key, value) = (split(0)?, split(1)?, split(2)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = query
            .matmul(&key.t()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .broadcast_add(bias)?;
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
        let exp = shifted.exp()?;
        let probs = exp
            .broadcast_div(&exp.sum_keepdim(D::Minus1)?)?
            .to_dtype(self.dtype)?;
        let context = probs
            .matmul(&value)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows * len, hidden))?;
        let attended = layer
            .attention_norm
            .forward(&(layer.attention_output.forward(&context)? + x)?)?;
        let inner = layer.intermediate.forward(&attended)?.gelu_erf()?;
        layer
            .output_norm
            .forward(&(layer.output.forward(&inner)? + &attended)?)
    }
}
