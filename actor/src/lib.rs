//! Actor runtime for meshflow (see issue: sans-IO actors, threaded driver, simulator).
