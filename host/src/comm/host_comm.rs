//! [`HostComm`]: one type for the communicators on host buffers — the ranks of a run as
//! threads of one process ([`LocalComm`]) or as processes ([`TcpComm`]) — so that training
//! code takes either without being generic.

use super::{CommElement, CommError, Communicator, LocalComm, ReduceOp, TcpComm};

/// A communicator on host buffers: in-process ranks or processes. See the module docs.
#[derive(Debug)]
pub enum HostComm {
    /// Ranks as threads of this process.
    Local(LocalComm),
    /// Ranks as processes, over TCP through rank 0.
    Tcp(TcpComm),
}

impl From<LocalComm> for HostComm {
    fn from(c: LocalComm) -> Self {
        HostComm::Local(c)
    }
}

impl From<TcpComm> for HostComm {
    fn from(c: TcpComm) -> Self {
        HostComm::Tcp(c)
    }
}

impl HostComm {
    /// Whether the ranks are separate processes.
    pub fn is_multi_process(&self) -> bool {
        matches!(self, HostComm::Tcp(_))
    }
}

macro_rules! each {
    ($self:expr, $c:ident => $e:expr) => {
        match $self {
            HostComm::Local($c) => $e,
            HostComm::Tcp($c) => $e,
        }
    };
}

impl Communicator for HostComm {
    type Buf<T: CommElement> = [T];

    fn rank(&self) -> usize {
        each!(self, c => c.rank())
    }

    fn world_size(&self) -> usize {
        each!(self, c => c.world_size())
    }

    fn all_reduce<T: CommElement>(&self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        each!(self, c => c.all_reduce(buf, op))
    }

    fn reduce_scatter<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        each!(self, c => c.reduce_scatter(input, output, op))
    }

    fn reduce_scatter_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        each!(self, c => c.reduce_scatter_uneven(input, output, op))
    }

    fn all_gather<T: CommElement>(&self, input: &[T], output: &mut [T]) -> Result<(), CommError> {
        each!(self, c => c.all_gather(input, output))
    }

    fn all_gather_uneven<T: CommElement>(
        &self,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), CommError> {
        each!(self, c => c.all_gather_uneven(input, output))
    }

    fn broadcast<T: CommElement>(&self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        each!(self, c => c.broadcast(buf, root))
    }

    fn barrier(&self) -> Result<(), CommError> {
        each!(self, c => c.barrier())
    }
}
