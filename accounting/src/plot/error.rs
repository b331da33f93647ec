//! Why a plot could not be made ([`PlotError`]), and the output [`Format`].

use std::path::{Path, PathBuf};

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The output name ends in neither `.svg` nor `.png`.
    #[error("{0}: unsupported output format; the file name must end in .svg or .png")]
    BadExtension(PathBuf),
    /// No manifest of the job was found.
    #[error(
        "no manifests of job {job_id}{cluster} in {dirs}; give manifest files with --manifest PATH"
    )]
    NoManifests {
        /// The job.
        job_id: u32,
        /// `" on cluster X"` or empty.
        cluster: String,
        /// The directories searched.
        dirs: String,
    },
    /// The spool is private job data the caller may not read.
    #[error(
        "the manifests of job {job_id} cannot be read: {dirs} is readable by root and the ergon group only (private job data, following Slurm's PrivateData); `ergon report {job_id}` shows your job's energy from sacct"
    )]
    Restricted {
        /// The job.
        job_id: u32,
        /// The directories refused.
        dirs: String,
    },
    /// A manifest file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Manifests of the job did not parse or verify.
    #[error("{} manifest(s) of job {job_id} failed verification, so a plot would be incomplete or wrong: {}", problems.len(), problems.join("; "))]
    Unverified {
        /// The job.
        job_id: u32,
        /// `"<path>: <reason>"` per manifest.
        problems: Vec<String>,
    },
    /// A manifest given with `--manifest` is of another job (or cluster).
    #[error(
        "{path} is the manifest of job {got} on cluster {cluster}, not of job {want}{want_cluster}"
    )]
    OtherJob {
        /// The file.
        path: PathBuf,
        /// Its job.
        got: u32,
        /// Its cluster.
        cluster: String,
        /// The job asked for.
        want: u32,
        /// `" on cluster X"` when one was asked for.
        want_cluster: String,
    },
    /// The job's manifests come from several clusters.
    #[error(
        "job {job_id} has manifests from several clusters ({clusters}); choose one with --cluster"
    )]
    SeveralClusters {
        /// The job.
        job_id: u32,
        /// The clusters, comma-separated.
        clusters: String,
    },
    /// The manifests hold no power trace.
    #[error("the manifests of job {job_id} (node(s) {nodes}) hold no power trace, so there is nothing to plot")]
    NoTrace {
        /// The job.
        job_id: u32,
        /// The nodes, comma-separated.
        nodes: String,
    },
    /// Drawing failed.
    #[error("drawing the plot: {0}")]
    Render(String),
    /// The output could not be written (the file is then as it was).
    #[error("writing the plot: {0}")]
    Write(#[from] ergon_protocol::durable::WriteError),
}

/// The output format, from the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.svg`: vector, text drawn by the viewer.
    Svg,
    /// `.png`: bitmap, text drawn with a TrueType font found at run time.
    Png,
}

impl Format {
    /// The format for `path`'s extension (case-insensitive), or [`PlotError::BadExtension`].
    pub fn from_path(path: &Path) -> Result<Format, PlotError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(PlotError::BadExtension(path.to_path_buf())),
        }
    }
}

pub(super) fn render_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Render(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(
            Format::from_path(Path::new("a/b.svg")).unwrap(),
            Format::Svg
        );
        assert_eq!(Format::from_path(Path::new("b.PNG")).unwrap(), Format::Png);
        for bad in ["b.pdf", "b", "svg", "b.svg.gz"] {
            let e = Format::from_path(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(".svg") && e.contains(".png"), "{e}");
        }
    }
}
