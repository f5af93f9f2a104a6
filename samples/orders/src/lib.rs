//! The orders sample's services as a library: the messages and the orders
//! service's data (`model`), the order saga (`saga`), and both services as
//! parts to build and start (`services`). The binary (`main.rs`) runs them;
//! the operations command line's tests run the saga half-way and rebuild its
//! activity.

// A sample: its steps print what they do.
#![allow(clippy::print_stdout)]

pub mod model;
pub mod saga;
pub mod services;
