//! Training data for the examples: a character tokenizer, seeded batches from a corpus, and token
//! files in the layout of `shared/formats/gpt-weights.md` (`data.tokens`, i64 `[steps, batch,
//! ctx + 1]`).

use std::path::Path;

use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// A character-level tokenizer: one id per distinct character of a corpus, in sorted order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl CharTokenizer {
    /// The tokenizer of every distinct character of `text`.
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        CharTokenizer { chars }
    }

    /// Number of distinct tokens.
    pub fn vocab(&self) -> usize {
        self.chars.len()
    }

    /// Token ids of `text`; a character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        text.chars()
            .map(|c| {
                self.chars.binary_search(&c).map(|i| i as i64).map_err(|_| {
                    Error::Data(format!("character {c:?} is not in the tokenizer's vocabulary"))
                })
            })
            .collect()
    }

    /// The text of token ids; ids out of range become U+FFFD.
    pub fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .map(|&i| usize::try_from(i).ok().and_then(|i| self.chars.get(i)).copied())
            .map(|c| c.unwrap_or('\u{fffd}'))
            .collect()
    }
}

/// Random windows of a token stream, reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Batches {
    tokens: Vec<i64>,
    batch: usize,
    ctx: usize,
    rng: rand::rngs::StdRng,
}

impl Batches {
    /// Windows of `ctx + 1` tokens, `batch` per step, drawn with a generator seeded by `seed`.
    pub fn new(tokens: Vec<i64>, batch: usize, ctx: usize, seed: u64) -> Result<Self> {
        if tokens.len() <= ctx + 1 {
            return Err(Error::Data(format!(
                "corpus of {} tokens is too short for windows of ctx + 1 = {}",
                tokens.len(),
                ctx + 1
            )));
        }
        Ok(Batches { tokens, batch, ctx, rng: rand::rngs::StdRng::seed_from_u64(seed) })
    }

    /// The next step's tokens, `batch × (ctx + 1)` row-major.
    pub fn next_step(&mut self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.batch * (self.ctx + 1));
        for _ in 0..self.batch {
            let start = self.rng.random_range(0..self.tokens.len() - self.ctx - 1);
            out.extend_from_slice(&self.tokens[start..start + self.ctx + 1]);
        }
        out
    }
}

/// A token file: `data.tokens`, i64 `[steps, batch, ctx + 1]`.
#[derive(Clone, Debug)]
pub struct TokenFile {
    tokens: Vec<i64>,
    /// Steps in the file.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Context length (each sequence holds ctx + 1 tokens).
    pub ctx: usize,
}

impl TokenFile {
    /// Reads a token file; errors name the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Data(format!("{name}: {e}")))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Data(format!("{name}: not a safetensors file: {e}")))?;
        let view = file
            .tensor("data.tokens")
            .map_err(|_| Error::Data(format!("{name}: no tensor named data.tokens")))?;
        if view.dtype() != safetensors::Dtype::I64 || view.shape().len() != 3 {
            return Err(Error::Data(format!(
                "{name}: data.tokens must be i64 [steps, batch, ctx + 1], found {:?} {:?}",
                view.dtype(),
                view.shape()
            )));
        }
        let (steps, batch, window) = (view.shape()[0], view.shape()[1], view.shape()[2]);
        if window < 2 {
            return Err(Error::Data(format!("{name}: sequences of {window} tokens are too short")));
        }
        let tokens = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8 bytes")))
            .collect();
        Ok(TokenFile { tokens, steps, batch, ctx: window - 1 })
    }

    /// Tokens of step `k`, `batch × (ctx + 1)` row-major.
    pub fn step(&self, k: usize) -> Result<&[i64]> {
        if k >= self.steps {
            return Err(Error::Data(format!(
                "step {k} asked of a token file of {} steps",
                self.steps
            )));
        }
        let size = self.batch * (self.ctx + 1);
        Ok(&self.tokens[k * size..(k + 1) * size])
    }
}

/// Splits step tokens `[batch, ctx + 1]` into inputs `[batch, ctx]` and next-token targets.
pub fn inputs_and_targets(step: &[i64], batch: usize, ctx: usize) -> (Vec<i64>, Vec<i64>) {
    let mut x = Vec::with_capacity(batch * ctx);
    let mut y = Vec::with_capacity(batch * ctx);
    for row in step.chunks_exact(ctx + 1).take(batch) {
        x.extend_from_slice(&row[..ctx]);
        y.extend_from_slice(&row[1..]);
    }
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_and_rejects_unknown() {
        let t = CharTokenizer::from_text("hello world");
        assert_eq!(t.vocab(), 8);
        let ids = t.encode("low").unwrap();
        assert_eq!(t.decode(&ids), "low");
        assert!(t.encode("xyz").unwrap_err().to_string().contains("'x'"));
    }

    #[test]
    fn batches_are_windows_and_reproducible() {
        let tokens: Vec<i64> = (0..100).collect();
        let mut a = Batches::new(tokens.clone(), 3, 5, 7).unwrap();
        let mut b = Batches::new(tokens, 3, 5, 7).unwrap();
        let step = a.next_step();
        assert_eq!(step, b.next_step());
        for row in step.chunks(6) {
            assert!(row.windows(2).all(|w| w[1] == w[0] + 1), "{row:?} is not a window");
        }
        let (x, y) = inputs_and_targets(&step, 3, 5);
        assert_eq!(x[1..5], y[..4]);
    }
}
