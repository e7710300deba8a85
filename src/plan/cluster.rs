//! A described cluster: nodes × devices per node of one device kind, with the links between them.
//!
//! `16x8:h100` is 16 nodes of 8 H100 SXM GPUs: NVLink inside a node, InfiniBand between nodes.
//! Device tables are built in ([`DeviceSpec::h100`], [`DeviceSpec::a100`], [`DeviceSpec::cpu`]);
//! every figure can be overridden ([`Overrides`]).

use std::fmt;
use std::str::FromStr;

/// Why a cluster description was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    /// Not of the form `NODESxPER_NODE:KIND`.
    #[error("cluster {text:?}: expected NODESxGPUS:KIND such as 16x8:h100 ({reason})")]
    Syntax {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More devices than [`MAX_DEVICES`].
    #[error(
        "cluster {text:?}: {nodes} × {per_node} devices are more than the {MAX_DEVICES} the \
         planner models (it lowers and simulates every rank, about 0.7 MB each for the GPT-2)"
    )]
    TooLarge {
        /// The text given.
        text: String,
        /// Nodes.
        nodes: usize,
        /// Devices per node.
        per_node: usize,
    },
    /// A device kind with no built-in table.
    #[error("cluster {text:?}: unknown device kind {kind:?} (known: h100, a100, cpu)")]
    UnknownKind {
        /// The text given.
        text: String,
        /// The kind asked for.
        kind: String,
    },
    /// An override that is not a positive finite number.
    #[error("cluster: {what} must be a positive finite number, got {value}")]
    BadValue {
        /// The figure.
        what: &'static str,
        /// The value given.
        value: f64,
    },
}

/// One link class: bandwidth one device gets in each direction, and latency per message hop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bytes per second per direction per device.
    pub bandwidth: f64,
    /// Seconds per hop (the α of the α–β model).
    pub latency: f64,
}

/// One device kind's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpec {
    /// Kind name (`h100` …).
    pub kind: String,
    /// Peak dense FLOP/s at the compute precision (the MFU denominator).
    pub peak_flops: f64,
    /// The fraction of peak that large matrix products reach (the roofline's compute roof is
    /// `peak_flops · matmul_efficiency`).
    pub matmul_efficiency: f64,
    /// FLOP/s of element-wise and reduction kernels (vector units, not matrix units).
    pub vector_flops: f64,
    /// Device memory in bytes.
    pub memory: f64,
    /// Memory bandwidth in bytes per second (the roofline's memory roof).
    pub memory_bandwidth: f64,
    /// Seconds every kernel costs on top of its roofline time (launch, dispatch).
    pub kernel_overhead: f64,
    /// Bytes per element the devices compute and communicate in (2 for bf16 mixed precision);
    /// the graph's own f32 byte counts are scaled by `element_bytes / 4` for time (not memory).
    pub element_bytes: f64,
    /// Bytes of cache one device's kernels keep their data in (its private cache plus its share
    /// of a shared one): measured kernels are priced warm for inputs touched fewer bytes ago
    /// than this, cold for inputs touched more ([`super::cost`]).
    pub cache_bytes: f64,
}

impl DeviceSpec {
    /// NVIDIA H100 SXM: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, 50 MB L2.
    pub fn h100() -> Self {
        DeviceSpec {
            kind: "h100".into(),
            peak_flops: 989e12,
            matmul_efficiency: 0.75,
            vector_flops: 67e12,
            memory: 80e9,
            memory_bandwidth: 3.35e12,
            kernel_overhead: 4e-6,
            element_bytes: 2.0,
            cache_bytes: 50e6,
        }
    }

    /// NVIDIA A100 SXM: 312 TFLOP/s dense bf16, 80 GB HBM2e at 2.04 TB/s, 40 MB L2.
    pub fn a100() -> Self {
        DeviceSpec {
            kind: "a100".into(),
            peak_flops: 312e12,
            matmul_efficiency: 0.75,
            vector_flops: 19.5e12,
            memory: 80e9,
            memory_bandwidth: 2.04e12,
            kernel_overhead: 4e-6,
            element_bytes: 2.0,
            cache_bytes: 40e6,
        }
    }

    /// A CPU device thread of this machine with default figures (f32); calibration
    /// ([`crate::plan::calibrate`]) replaces them with measured ones.
    pub fn cpu() -> Self {
        DeviceSpec {
            kind: "cpu".into(),
            peak_flops: 50e9,
            matmul_efficiency: 1.0,
            vector_flops: 2e9,
            memory: 16e9,
            memory_bandwidth: 10e9,
            kernel_overhead: 5e-6,
            element_bytes: 4.0,
            cache_bytes: super::machine::DEFAULT_CACHE_BYTES,
        }
    }

    /// Seconds of an act that does `flops` of which `matrix` are matrix products
    /// ([`meshflow_ops::Op::matrix_flops`]) and moves `bytes` (f32 counts): the roofline, with
    /// the products at the matrix roof and the rest at the vector roof.
    pub fn kernel_seconds(&self, flops: u64, matrix: u64, bytes: u64) -> f64 {
        let scale = self.element_bytes / 4.0;
        let matrix = matrix.min(flops);
        let compute = matrix as f64 / (self.peak_flops * self.matmul_efficiency)
            + (flops - matrix) as f64 / self.vector_flops;
        let memory = bytes as f64 * scale / self.memory_bandwidth;
        self.kernel_overhead + compute.max(memory)
    }
}

/// A cluster: `nodes` × `per_node` devices of one kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Nodes.
    pub nodes: usize,
    /// Devices per node.
    pub per_node: usize,
    /// The devices.
    pub device: DeviceSpec,
    /// Between devices of one node.
    pub intra: Link,
    /// Between nodes (per device).
    pub inter: Link,
}

impl Cluster {
    /// Every device.
    pub fn devices(&self) -> usize {
        self.nodes * self.per_node
    }

    /// The node of a rank (ranks fill node 0 first).
    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.per_node.max(1)
    }

    /// The link a group of ranks communicates over: inside one node, or across nodes.
    pub fn link(&self, ranks: &[usize]) -> Link {
        let first = ranks.first().map(|&r| self.node_of(r));
        if ranks.iter().all(|&r| Some(self.node_of(r)) == first) {
            self.intra
        } else {
            self.inter
        }
    }

    /// The built-in links of a device kind: NVLink 4 (450 GB/s per direction) and 400 Gb/s
    /// InfiniBand per GPU for H100; NVLink 3 (300 GB/s) and 200 Gb/s for A100; shared memory for
    /// CPU devices in one process.
    fn links(kind: &str) -> (Link, Link) {
        match kind {
            "h100" => {
                (Link { bandwidth: 450e9, latency: 3e-6 }, Link { bandwidth: 50e9, latency: 6e-6 })
            }
            "a100" => {
                (Link { bandwidth: 300e9, latency: 3e-6 }, Link { bandwidth: 25e9, latency: 6e-6 })
            }
            _ => (Link { bandwidth: 5e9, latency: 20e-6 }, Link { bandwidth: 1e9, latency: 50e-6 }),
        }
    }

    /// Applies `overrides`, refusing values that are not positive and finite.
    pub fn with(mut self, overrides: &Overrides) -> Result<Self, ClusterError> {
        let set = |target: &mut f64, value: Option<f64>, scale: f64, what: &'static str| match value
        {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(ClusterError::BadValue { what, value: v })
            }
            Some(v) => {
                *target = v * scale;
                Ok(())
            }
            None => Ok(()),
        };
        let o = overrides;
        set(&mut self.intra.bandwidth, o.intra_bandwidth, 1e9, "intra-node bandwidth")?;
        set(&mut self.intra.latency, o.intra_latency, 1e-6, "intra-node latency")?;
        set(&mut self.inter.bandwidth, o.inter_bandwidth, 1e9, "inter-node bandwidth")?;
        set(&mut self.inter.latency, o.inter_latency, 1e-6, "inter-node latency")?;
        set(&mut self.device.peak_flops, o.tflops, 1e12, "device TFLOP/s")?;
        set(&mut self.device.memory, o.memory_gb, 1e9, "device memory")?;
        set(&mut self.device.memory_bandwidth, o.hbm_bandwidth, 1e9, "memory bandwidth")?;
        set(&mut self.device.matmul_efficiency, o.matmul_efficiency, 1.0, "matmul efficiency")?;
        Ok(self)
    }
}

/// Overrides of a cluster's figures (units as the flags take them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// Intra-node bandwidth, GB/s per direction.
    pub intra_bandwidth: Option<f64>,
    /// Intra-node latency, µs.
    pub intra_latency: Option<f64>,
    /// Inter-node bandwidth per device, GB/s.
    pub inter_bandwidth: Option<f64>,
    /// Inter-node latency, µs.
    pub inter_latency: Option<f64>,
    /// Device peak, TFLOP/s.
    pub tflops: Option<f64>,
    /// Device memory, GB.
    pub memory_gb: Option<f64>,
    /// Device memory bandwidth, GB/s.
    pub hbm_bandwidth: Option<f64>,
    /// Fraction of peak that matrix products reach.
    pub matmul_efficiency: Option<f64>,
}

/// The most devices a described cluster may have: the planner builds every rank's plan, so its
/// memory grows with the devices (the GPT-2's plan, measured with `/usr/bin/time`: peak RSS
/// 0.71 GiB and 9.5 s for 128x8, 10.8 GiB and 608 s for 2048x8), and 16 Ki devices stay within
/// a 24 GiB machine.
pub const MAX_DEVICES: usize = 16 * 1024;

impl FromStr for Cluster {
    type Err = ClusterError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax =
            |reason: &str| ClusterError::Syntax { text: text.into(), reason: reason.into() };
        let (shape, kind) = text.trim().split_once(':').ok_or_else(|| syntax("no ':KIND'"))?;
        let (nodes, per_node) = shape
            .split_once(['x', 'X'])
            .ok_or_else(|| syntax("no 'x' between nodes and devices"))?;
        let count = |field: &str, what: &str| -> Result<usize, ClusterError> {
            match field.trim().parse::<usize>() {
                Ok(0) => Err(syntax(&format!("{what} must be at least 1"))),
                Ok(n) => Ok(n),
                Err(_) => Err(syntax(&format!("{what} {field:?} is not a whole number"))),
            }
        };
        let (nodes, per_node) = (count(nodes, "nodes")?, count(per_node, "devices per node")?);
        if nodes.checked_mul(per_node).is_none_or(|devices| devices > MAX_DEVICES) {
            return Err(ClusterError::TooLarge { text: text.into(), nodes, per_node });
        }
        let kind = kind.trim().to_ascii_lowercase();
        let device = match kind.as_str() {
            "h100" => DeviceSpec::h100(),
            "a100" => DeviceSpec::a100(),
            "cpu" => DeviceSpec::cpu(),
            _ => return Err(ClusterError::UnknownKind { text: text.into(), kind }),
        };
        let (intra, inter) = Cluster::links(&kind);
        Ok(Cluster { nodes, per_node, device, intra, inter })
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.device;
        write!(
            f,
            "{}x{}:{} ({} devices; {:.0} TFLOP/s peak, {:.0} GB, {:.2} TB/s memory; intra {:.0} GB/s \
             {:.1} µs, inter {:.1} GB/s {:.1} µs)",
            self.nodes,
            self.per_node,
            d.kind,
            self.devices(),
            d.peak_flops / 1e12,
            d.memory / 1e9,
            d.memory_bandwidth / 1e12,
            self.intra.bandwidth / 1e9,
            self.intra.latency * 1e6,
            self.inter.bandwidth / 1e9,
            self.inter.latency * 1e6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nodes_devices_and_kind() {
        let cluster: Cluster = "16x8:h100".parse().unwrap();
        assert_eq!((cluster.nodes, cluster.per_node, cluster.devices()), (16, 8, 128));
        assert_eq!(cluster.device.peak_flops, 989e12);
        assert_eq!(cluster.intra.bandwidth, 450e9);
        assert_eq!(cluster.inter.bandwidth, 50e9);
        assert_eq!(cluster.link(&[0, 7]), cluster.intra);
        assert_eq!(cluster.link(&[7, 8]), cluster.inter);
    }

    #[test]
    fn roofline_prices_products_at_the_matrix_roof_and_the_rest_at_the_vector_roof() {
        let device = DeviceSpec {
            peak_flops: 100.0,
            matmul_efficiency: 0.5,
            vector_flops: 10.0,
            memory_bandwidth: 4.0,
            kernel_overhead: 1.0,
            element_bytes: 4.0,
            ..DeviceSpec::cpu()
        };
        // 100 matrix FLOPs at 50/s, 20 others at 10/s: 4 s of compute against 2 s of bytes.
        assert_eq!(device.kernel_seconds(120, 100, 8), 1.0 + 2.0 + 2.0);
        // An element-wise op: all at the vector roof, or the memory roof when that is slower.
        assert_eq!(device.kernel_seconds(20, 0, 8), 1.0 + 2.0);
        assert_eq!(device.kernel_seconds(20, 0, 40), 1.0 + 10.0);
        // Matrix FLOPs beyond the op's FLOPs are a broken op, not negative vector work.
        assert_eq!(device.kernel_seconds(100, 500, 0), 1.0 + 2.0);
        // 16-bit elements move half the bytes of the f32 counts.
        let half = DeviceSpec { element_bytes: 2.0, ..device };
        assert_eq!(half.kernel_seconds(0, 0, 40), 1.0 + 5.0);
    }

    #[test]
    fn refuses_bad_text_with_the_reason() {
        let error = |text: &str| text.parse::<Cluster>().unwrap_err().to_string();
        assert!(error("16x8").contains("no ':KIND'"), "{}", error("16x8"));
        assert!(error("16:h100").contains("no 'x'"));
        assert!(error("0x8:h100").contains("nodes must be at least 1"));
        // A cluster the planner cannot hold (it aborted allocating 80 GB), or whose device
        // count overflows, is refused; the largest allowed parses.
        for text in ["100000x100000:h100", "18446744073709551615x2:h100", "2049x8:h100"] {
            assert!(error(text).contains("more than the 16384 the planner models"), "{text}");
        }
        assert_eq!("2048x8:h100".parse::<Cluster>().unwrap().devices(), MAX_DEVICES);
        assert!(error("2xa:h100").contains("devices per node \"a\" is not a whole number"));
        assert!(error("2x8:tpu").contains("unknown device kind \"tpu\""));
    }

    #[test]
    fn overrides_replace_figures_and_refuse_nonsense() {
        let cluster: Cluster = "2x4:h100".parse().unwrap();
        let overrides =
            Overrides { inter_bandwidth: Some(100.0), tflops: Some(500.0), ..Overrides::default() };
        let changed = cluster.clone().with(&overrides).unwrap();
        assert_eq!(changed.inter.bandwidth, 100e9);
        assert_eq!(changed.device.peak_flops, 500e12);
        let bad = Overrides { intra_latency: Some(-1.0), ..Overrides::default() };
        assert_eq!(
            cluster.with(&bad).unwrap_err(),
            ClusterError::BadValue { what: "intra-node latency", value: -1.0 }
        );
    }
}
