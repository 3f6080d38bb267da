//! Weight matrices: our runtime-dispatched kernels where we have them
//! (Q4_1, Q8_0, and float weights as stored), candle's `QMatMul` otherwise.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::float::FloatMatrix;
use crate::quant::QuantMatrix;
use crate::Error;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use candle's matmul kernels everywhere instead of ours. Slower in a
    /// portable build; it isolates the forward pass from kernel rounding when
    /// comparing with candle's reference model.
    pub candle_kernels: bool,
}

/// A weight matrix `[out, in]`; [`forward`](Linear::forward) maps
/// `[rows, in]` to `[rows, out]`, each row on its own.
pub enum Linear {
    Ours(QuantMatrix),
    Float(FloatMatrix),
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(name: &str, t: QTensor, opts: &LoadOptions) -> Result<Self, Error> {
        if QuantMatrix::supports(t.dtype()) && !opts.candle_kernels {
            return Ok(Linear::Ours(QuantMatrix::from_qtensor(&t)?));
        }
        let t = check_candle_kernel_layout(name, t)?;
        Ok(Linear::Candle(QMatMul::from_qtensor(t)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        match self {
            Linear::Ours(m) => m.forward(x),
            Linear::Float(m) => m.forward(x),
            Linear::Candle(m) => Ok(m.forward(x)?),
        }
    }
}

/// candle's Q4_1/Q5_0/Q5_1 dot products process blocks in pairs and panic
/// (poisoning the thread pool) on an odd count; refuse such a matrix at load
/// when candle's kernels would run it (ours take any count).
fn check_candle_kernel_layout(name: &str, t: QTensor) -> Result<QTensor, Error> {
    if matches!(
        t.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    ) {
        let row = t.shape().dims().last().copied().unwrap_or(0);
        if !(row / t.dtype().block_size()).is_multiple_of(2) {
            return Err(Error::Unsupported(format!(
                "{name}: {:?} rows of {row} values (an odd number of blocks)",
                t.dtype()
            )));
        }
    }
    Ok(t)
}
