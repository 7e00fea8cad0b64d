//! Which device communicator the ranks of a device run use, decided once before the ranks
//! start, so that every rank makes the same choice.
//!
//! `--comm` / `LATHE_COMM`: `host` always stages through host memory; `nccl` demands NCCL on
//! CUDA devices and fails clearly anywhere else; `auto` (the default) uses NCCL on CUDA devices
//! when the NCCL library loads and says in one line when it falls back. Simulated devices and
//! the CPU always stage through the host. With NCCL, rank 0 creates the unique id: in-process
//! ranks share it directly, launched processes receive it in the same rendezvous round that
//! connects their host communicators ([`TcpComm::connect_group_sharing`]).
//!
//! [`TcpComm::connect_group_sharing`]: lathe_host::comm::TcpComm::connect_group_sharing

use crate::config::CommArg;
use anyhow::{Result, bail};
use lathe_host::comm::{NcclId, nccl_available};

/// What the ranks train on, as far as the communicator cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RankDevice {
    Cpu,
    Sim,
    Cuda,
}

/// Whether this process's ranks should exchange over NCCL: `Ok(false)` for host staging, an
/// error when NCCL is demanded where it cannot run. Prints the one-line fallback warning of
/// `auto`.
pub(super) fn wants_nccl(comm: CommArg, world: usize, device: RankDevice) -> Result<bool> {
    let forced = comm == CommArg::Nccl;
    match (comm, device) {
        (CommArg::Host, _) => return Ok(false),
        (CommArg::Nccl, RankDevice::Cpu) => bail!(
            "--comm nccl ({}=nccl): NCCL exchanges device buffers, and this run trains on the \
             CPU; use --device cuda, or --comm host",
            CommArg::ENV
        ),
        (CommArg::Nccl, RankDevice::Sim) => bail!(
            "--comm nccl ({}=nccl): NCCL is not available on simulated devices (--device sim); \
             it needs CUDA devices. Use --comm host or auto",
            CommArg::ENV
        ),
        (CommArg::Auto, RankDevice::Cpu | RankDevice::Sim) => return Ok(false),
        (_, RankDevice::Cuda) => {}
    }
    if world <= 1 && !forced {
        return Ok(false);
    }
    match nccl_available() {
        Ok(()) => Ok(world > 1),
        Err(e) if forced => bail!("--comm nccl ({}=nccl): {e}", CommArg::ENV),
        Err(e) => {
            eprintln!(
                "warning: {e}; device ranks exchange through host memory (set {}=host to \
                 silence this)",
                CommArg::ENV
            );
            Ok(false)
        }
    }
}

/// Rank 0's NCCL id when `want`: `None` when not wanted, or when creating it fails under
/// `auto` (with a one-line warning); an error when it fails under `nccl`.
pub(super) fn create_id(comm: CommArg, want: bool) -> Result<Option<NcclId>> {
    if !want {
        return Ok(None);
    }
    match NcclId::new() {
        Ok(id) => Ok(Some(id)),
        Err(e) if comm == CommArg::Nccl => bail!("--comm nccl ({}=nccl): {e}", CommArg::ENV),
        Err(e) => {
            eprintln!("warning: {e}; device ranks exchange through host memory");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_staging_off_cuda_and_clear_errors_when_nccl_is_demanded() {
        for world in [1, 2] {
            for d in [RankDevice::Cpu, RankDevice::Sim, RankDevice::Cuda] {
                assert!(!wants_nccl(CommArg::Host, world, d).unwrap());
            }
            assert!(!wants_nccl(CommArg::Auto, world, RankDevice::Sim).unwrap());
            assert!(!wants_nccl(CommArg::Auto, world, RankDevice::Cpu).unwrap());
            let e = wants_nccl(CommArg::Nccl, world, RankDevice::Sim).unwrap_err();
            assert!(e.to_string().contains("simulated"), "{e}");
            let e = wants_nccl(CommArg::Nccl, world, RankDevice::Cpu).unwrap_err();
            assert!(e.to_string().contains("CPU"), "{e}");
        }
        if let Err(missing) = nccl_available() {
            // A machine without the libraries: `auto` falls back, `nccl` names what is missing.
            assert!(!wants_nccl(CommArg::Auto, 2, RankDevice::Cuda).unwrap());
            let e = wants_nccl(CommArg::Nccl, 2, RankDevice::Cuda).unwrap_err();
            assert!(e.to_string().contains(&missing.to_string()), "{e}");
            assert!(create_id(CommArg::Nccl, true).is_err());
            assert_eq!(create_id(CommArg::Auto, true).unwrap(), None);
        }
        assert_eq!(create_id(CommArg::Nccl, false).unwrap(), None);
    }
}
