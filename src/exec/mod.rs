//! Execution helpers shared by the session: data movement on host tensors and the boxing
//! executor.

pub mod boxing;
pub mod even;
pub mod layout;
