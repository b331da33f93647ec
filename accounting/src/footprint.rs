//! What a job record carries of its CO2e and energy cost (`JobRecordFull::footprint`): the
//! figures and the factors they used. Plain data, a leaf: `carbon` computes them, `job` holds
//! them, and neither imports the other for it.

use serde::{Deserialize, Serialize};

/// What a figure used of one factor: enough to reproduce the figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorUsed {
    /// `static`, `file <path>`, `url <url>`, `tariff <windows> UTC<offset>`, and for a
    /// source that could not be read, why.
    pub origin: String,
    /// The site's description of the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The value for a static factor; for a varying one, the energy-weighted mean over the
    /// part of the job where it was known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The lowest and highest value applied (a varying factor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// See `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// How a job's energy was laid out over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileMethod {
    /// Every node's trace covers its whole span.
    Trace,
    /// Traces cover part of the job; the rest at the trace's mean power.
    TracePartial,
    /// No node has a trace: energy spread evenly over each node's span.
    Even,
}

/// A job's CO2e.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarbonFigure {
    /// Operational CO2e, grams: energy × intensity × PUE, interval by interval, over the part of
    /// the job where both are known.
    pub operational_g: f64,
    /// Embodied CO2e, grams; absent when no embodied factor is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embodied_g: Option<f64>,
    /// `operational_g + embodied_g`.
    pub total_g: f64,
    /// The fraction of the job's energy for which the intensity or PUE was unknown (its CO2e
    /// is not in `operational_g`); 0 when complete.
    pub missing_energy_fraction: f64,
    /// The fraction of the job's node-time for which the intensity or PUE was unknown.
    pub missing_time_fraction: f64,
    /// Intensity, gCO2e/kWh.
    pub intensity: FactorUsed,
    /// PUE.
    pub pue: FactorUsed,
    /// gCO2e per GPU-hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embodied_g_per_gpu_hour: Option<f64>,
    /// gCO2e per node-hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embodied_g_per_node_hour: Option<f64>,
    /// Where the embodied factors come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embodied_source: Option<String>,
    /// GPU-hours the embodied part is over.
    pub gpu_hours: f64,
    /// Node-hours the embodied part is over.
    pub node_hours: f64,
}

/// A job's energy cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostFigure {
    /// The cost, in `currency`, over the part of the job where the price (and PUE, when
    /// applied) is known.
    pub amount: f64,
    /// The currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The fraction of the job's energy with no known price (or PUE).
    pub missing_energy_fraction: f64,
    /// The price per kWh.
    pub price: FactorUsed,
    /// The PUE, when the cost is of the facility's energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pue: Option<FactorUsed>,
}

/// What the record carries: CO2e and cost, and how the energy was laid out over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Footprint {
    /// How the energy was laid out over time.
    pub method: ProfileMethod,
    /// The fraction of the job's node-time its traces covered.
    pub trace_time_fraction: f64,
    /// CO2e, when `[carbon]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carbon: Option<CarbonFigure>,
    /// Cost, when `[cost]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostFigure>,
}
