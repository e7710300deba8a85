//! Newtype ids: actors, edges, registers and devices are never bare integers.

use std::fmt;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u32);

        impl $name {
            /// The id as an index into the plan's tables.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id!(
    /// One actor of a [`Plan`](crate::Plan): its index in `Plan::actors`.
    ActorId,
    "actor"
);
id!(
    /// One edge of a [`Plan`](crate::Plan): its index in `Plan::edges`.
    EdgeId,
    "edge"
);
id!(
    /// One register, numbered over the whole plan: the registers of edge `e` are
    /// `plan.registers(e)`. The executor owns the buffer behind each id.
    RegisterId,
    "register"
);
id!(
    /// One device stream: one OS thread of the threaded driver, one lane of a trace.
    DeviceId,
    "device"
);
