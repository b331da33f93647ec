//! [`CgroupPath`] and [`parse_proc_cgroup`]: where a step's processes live.

use serde::{Deserialize, Serialize};

/// One cgroup a process belongs to: a controller and the path below that controller's mount.
///
/// The SPANK plugin reads `/proc/self/cgroup` inside the step and sends the result in
/// [`StepStart`](crate::wire::StepStart); ergond then reads CPU time from
/// `<cgroup root>/<controller>/<path>` (v1) or `<cgroup root>/<path>` (v2). Sending the
/// exact paths means ergond never has to guess Slurm's layout, which differs between
/// versions and configurations (`slurm_<node>/uid_0/job_5/step_0` on 22.05 with cgroup/v1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CgroupPath {
    /// The v1 controller (`"cpuacct"`, `"memory"`, a named hierarchy such as
    /// `"name=systemd"`), or `""` for the v2 unified hierarchy.
    pub controller: String,
    /// The path as `/proc/<pid>/cgroup` shows it: absolute with respect to the controller's
    /// mount point, e.g. `/slurm_node1/uid_0/job_5/step_0/task_0`.
    pub path: String,
}

impl CgroupPath {
    /// Whether this is the v2 unified hierarchy's entry.
    pub fn is_unified(&self) -> bool {
        self.controller.is_empty()
    }
}

/// A line of `/proc/<pid>/cgroup` that does not have the kernel's format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid /proc/<pid>/cgroup line {line_no} {line:?}: {reason}; expected \"hierarchy-id:controller-list:path\"")]
pub struct CgroupParseError {
    /// 1-based line number.
    pub line_no: usize,
    /// The offending line.
    pub line: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parse the contents of `/proc/<pid>/cgroup` (see cgroups(7)).
///
/// Each line is `hierarchy-id:controller-list:path`. A v1 line listing several controllers
/// (`4:cpu,cpuacct:/slurm/…`) gives one entry per controller with the same path; the v2 line
/// (`0::/…`) gives controller `""`; named hierarchies (`1:name=systemd:/…`) are kept as named.
/// Empty lines are skipped. The path is everything after the second colon, so a path that
/// itself contains a colon survives.
pub fn parse_proc_cgroup(text: &str) -> Result<Vec<CgroupPath>, CgroupParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason| CgroupParseError {
            line_no: i + 1,
            line: line.to_owned(),
            reason,
        };
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(err("fewer than three colon-separated fields"));
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("hierarchy id is not a number"));
        }
        if !path.starts_with('/') {
            return Err(err("path does not start with '/'"));
        }
        if controllers.is_empty() {
            out.push(CgroupPath {
                controller: String::new(),
                path: path.to_owned(),
            });
            continue;
        }
        for controller in controllers.split(',') {
            if controller.is_empty() {
                return Err(err("empty controller name"));
            }
            out.push(CgroupPath {
                controller: controller.to_owned(),
                path: path.to_owned(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cg(controller: &str, path: &str) -> CgroupPath {
        CgroupPath {
            controller: controller.into(),
            path: path.into(),
        }
    }

    /// As a task of job 5, step 0 saw it under Slurm 22.05 with cgroup/v1 on a Debian 12
    /// hybrid mount (cpuacct is its own hierarchy there, not joined with cpu).
    #[test]
    fn parses_slurm_v1_hybrid() {
        let text = "\
13:misc:/
12:rdma:/
11:hugetlb:/
10:net_cls,net_prio:/
9:memory:/slurm_host/uid_0/job_5/step_0/task_0
8:freezer:/slurm_host/uid_0/job_5/step_0
7:devices:/slurm_host/uid_0/job_5/step_0/task_0
6:cpuset:/slurm_host/uid_0/job_5/step_0
5:pids:/system.slice/slurmd.service
4:blkio:/system.slice/slurmd.service
3:cpu:/system.slice/slurmd.service
2:cpuacct:/slurm_host/uid_0/job_5/step_0/task_0
1:name=systemd:/system.slice/slurmd.service
0::/system.slice/slurmd.service
";
        let got = parse_proc_cgroup(text).unwrap();
        assert_eq!(got.len(), 15);
        assert!(got.contains(&cg("cpuacct", "/slurm_host/uid_0/job_5/step_0/task_0")));
        assert!(got.contains(&cg("net_cls", "/")));
        assert!(got.contains(&cg("net_prio", "/")));
        assert!(got.contains(&cg("name=systemd", "/system.slice/slurmd.service")));
        assert!(got.contains(&cg("", "/system.slice/slurmd.service")));
        assert_eq!(got.iter().filter(|c| c.is_unified()).count(), 1);
    }

    #[test]
    fn splits_joint_controllers() {
        let got = parse_proc_cgroup("12:cpu,cpuacct:/slurm_node1/uid_0/job_5/step_batch/task_0\n")
            .unwrap();
        assert_eq!(
            got,
            vec![
                cg("cpu", "/slurm_node1/uid_0/job_5/step_batch/task_0"),
                cg("cpuacct", "/slurm_node1/uid_0/job_5/step_batch/task_0"),
            ]
        );
    }

    #[test]
    fn parses_pure_v2() {
        let got = parse_proc_cgroup("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
            .unwrap();
        assert_eq!(
            got,
            vec![cg(
                "",
                "/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"
            )]
        );
    }

    #[test]
    fn keeps_colons_in_paths_and_skips_blank_lines() {
        let got = parse_proc_cgroup("\n3:memory:/a:b\n\n").unwrap();
        assert_eq!(got, vec![cg("memory", "/a:b")]);
    }

    #[test]
    fn rejects_malformed_lines_naming_the_line() {
        let e = parse_proc_cgroup("0::/ok\nnot a cgroup line\n").unwrap_err();
        assert_eq!(e.line_no, 2);
        assert!(e.to_string().contains("not a cgroup line"));
        assert!(parse_proc_cgroup("x:memory:/a").is_err());
        assert!(parse_proc_cgroup("3:memory:relative").is_err());
        assert!(parse_proc_cgroup("3:cpu,,cpuacct:/a").is_err());
        assert!(parse_proc_cgroup("3:memory").is_err());
    }
}
