//! Pictures of a compiled program in Graphviz DOT (`dot -Tsvg plan.dot > plan.svg`).
//!
//! [`View::Logical`] draws the user's graph: one node per op or leaf, one edge per use of a
//! value, labelled with the value's shape and the nd-SBP its producer gives it, and — in red —
//! the nd-SBP the consumer needed when the compiler had to box it. [`View::Physical`] draws the
//! program's steps in their global order: leaves, kernels and boxing steps (with their
//! collectives), edges labelled with the layout of the slot that flows. Both group nodes into one
//! cluster per placement, so pipeline stages appear side by side.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use meshflow_placement::Placement;

use super::{Program, Slot, Step};
use crate::graph::Source;

/// Which graph to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The logical graph with SBPs on its edges.
    Logical,
    /// The steps every rank runs, boxing included.
    Physical,
}

impl Program {
    /// The program as a DOT digraph (see the module doc).
    pub fn to_dot(&self, view: View) -> String {
        let mut dot = Dot::default();
        match view {
            View::Logical => self.logical(&mut dot),
            View::Physical => self.physical(&mut dot),
        }
        dot.finish()
    }

    fn logical(&self, dot: &mut Dot) {
        let graph = &self.graph;
        let mut producer: HashMap<u32, String> = HashMap::new();
        for (index, info) in graph.values.iter().enumerate() {
            if matches!(info.source, Source::Node { .. }) {
                continue;
            }
            let id = format!("v{index}");
            let label = graph.label(meshflow_ops::Value(index as u32));
            dot.node(&info.placement, &id, &label, "ellipse");
            producer.insert(index as u32, id);
        }
        for (index, node) in graph.nodes.iter().enumerate() {
            let id = format!("n{index}");
            dot.node(&node.placement, &id, node.op.name(), "box");
            for output in &node.outputs {
                producer.insert(output.0, id.clone());
            }
        }
        let needed = self.boxed_inputs();
        for (index, node) in graph.nodes.iter().enumerate() {
            for (position, value) in node.inputs.iter().enumerate() {
                let from = &producer[&value.0];
                let produced = &self.slot(self.produced[value.0 as usize]).layout;
                let shape = &graph.value(*value).meta.shape;
                let mut label = format!("{shape} {}", produced.nd_sbp);
                let mut color = "black";
                if let Some(target) = needed.get(&(index, position)) {
                    let _ = write!(label, " ⇒ {target}");
                    color = "red";
                }
                dot.edge(from, &format!("n{index}"), &label, color);
            }
        }
    }

    /// For each (node, input position) whose input was boxed, the layout the node needed.
    fn boxed_inputs(&self) -> HashMap<(usize, usize), String> {
        let mut needed = HashMap::new();
        for step in &self.steps {
            let Step::Kernel { node, inputs, .. } = step else { continue };
            let graph_node = self.graph.node(*node);
            for (position, (slot, value)) in inputs.iter().zip(&graph_node.inputs).enumerate() {
                if *slot != self.produced[value.0 as usize] {
                    let layout = &self.slot(*slot).layout;
                    needed.insert((node.0 as usize, position), layout.to_string());
                }
            }
        }
        needed
    }

    fn physical(&self, dot: &mut Dot) {
        let mut writer: HashMap<Slot, String> = HashMap::new();
        for (index, step) in self.steps.iter().enumerate() {
            let id = format!("s{index}");
            let (placement, label, shape, reads, writes) = match step {
                Step::Leaf { value, slot } => {
                    let placement = &self.slot(*slot).layout.placement;
                    let label = format!("{index}: {}", self.graph.label(*value));
                    (placement, label, "ellipse", Vec::new(), vec![*slot])
                }
                Step::Kernel { node, inputs, outputs, .. } => {
                    let n = self.graph.node(*node);
                    let label = format!("{index}: {}", n.op.name());
                    (&n.placement, label, "box", inputs.clone(), outputs.clone())
                }
                Step::Boxing { from, to, plan } => {
                    let kinds: Vec<String> = plan.steps.iter().map(|s| s.to_string()).collect();
                    let label = format!("{index}: boxing\\n{}", kinds.join("\\n"));
                    let placement = &self.slot(*to).layout.placement;
                    (placement, label, "diamond", vec![*from], vec![*to])
                }
            };
            dot.node(placement, &id, &label, shape);
            for slot in reads {
                if let Some(from) = writer.get(&slot) {
                    let info = self.slot(slot);
                    let meta = &self.graph.value(info.value).meta;
                    let label = format!("{} {}", meta.shape, info.layout.nd_sbp);
                    dot.edge(from, &id, &label, "black");
                }
            }
            for slot in writes {
                writer.insert(slot, id.clone());
            }
        }
    }
}

/// A DOT document under construction: nodes grouped by placement, then edges.
#[derive(Default)]
struct Dot {
    clusters: BTreeMap<String, Vec<String>>,
    edges: Vec<String>,
}

impl Dot {
    fn node(&mut self, placement: &Placement, id: &str, label: &str, shape: &str) {
        let line = format!("    {id} [label=\"{}\", shape={shape}];", escape(label));
        self.clusters.entry(placement.to_string()).or_default().push(line);
    }

    fn edge(&mut self, from: &str, to: &str, label: &str, color: &str) {
        let label = escape(label);
        self.edges.push(format!("  {from} -> {to} [label=\"{label}\", color={color}];"));
    }

    fn finish(self) -> String {
        let mut out = String::from("digraph meshflow {\n  rankdir=TB;\n  node [fontsize=10];\n");
        out.push_str("  edge [fontsize=8];\n");
        for (index, (placement, nodes)) in self.clusters.iter().enumerate() {
            let _ = writeln!(out, "  subgraph cluster_{index} {{\n    label=\"{placement}\";");
            for node in nodes {
                let _ = writeln!(out, "{node}");
            }
            out.push_str("  }\n");
        }
        for edge in &self.edges {
            let _ = writeln!(out, "{edge}");
        }
        out.push_str("}\n");
        out
    }
}

/// `text` inside a DOT double-quoted string (keeps `\n` line breaks).
fn escape(text: &str) -> String {
    text.replace('"', "\\\"")
}
