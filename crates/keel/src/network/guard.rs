//! What a node believes of a peer's message, decided before openraft sees it.
//!
//! The peer port is a trust boundary: without peer TLS, anyone who reaches it can send any
//! message (`docs/security.md`). openraft trusts what it is handed, so Keel checks each message
//! here first, on a view of this node's own Raft state:
//!
//! - **Senders are members.** A vote or pre-vote must come from a voter, replication and
//!   snapshots from a voter (only a voter leads), a forwarded request from a member (voter or
//!   learner) — of the effective or the last committed membership, so that a change in progress
//!   cuts nobody off early. A node that is not yet a member of any cluster (empty membership)
//!   takes messages from anyone: it is waiting to be added or initialized, and holds nothing.
//! - **Terms are reachable.** A term more than [`MAX_TERM_STEP`] above this node's is refused: no
//!   run of real elections gets there, and a term near `u64::MAX` would make the next election
//!   wrap (openraft then never elects again, or panics at start).
//! - **Leadership transfers come from the leader.** A vote request flagged `leadership_transfer`
//!   overrides the leader lease on the voter. The flag is honoured only for the candidate that
//!   this node's known leader named in a `TransferLeader` message; otherwise it is cleared, and
//!   the request is judged as an ordinary vote (the lease holds).
//!
//! The decisions are pure functions of a [`View`], so tests assert on values.

use std::collections::BTreeSet;

use openraft::vote::RaftLeaderId;

use crate::types::NodeId;
use crate::types::StoredMembership;
use crate::types::Term;
use crate::types::Vote;

/// The most a peer's term may exceed this node's. Elections raise the term by one each; with
/// pre-vote, a node cut off from the cluster does not raise it at all. A million elections at
/// one per election timeout (0.5–1 s) is days of continuous failed elections.
pub const MAX_TERM_STEP: Term = 1 << 20;

/// Why a peer message was refused at the edge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("node {sender} is not a voter of this cluster; only a voter may {what}")]
    NotAVoter { sender: NodeId, what: &'static str },
    #[error("node {sender} is not a member of this cluster")]
    NotAMember { sender: NodeId },
    #[error(
        "term {term} from node {sender} is more than {MAX_TERM_STEP} above this node's term {local}; \
         no real election reaches it"
    )]
    TermOutOfReach { sender: NodeId, term: Term, local: Term },
    #[error("a leadership transfer from node {sender} at term {term}, but this node's leader is {leader:?} at term {local}")]
    TransferNotFromLeader { sender: NodeId, term: Term, leader: Option<NodeId>, local: Term },
    #[error("another snapshot is being received; retry when it is done")]
    SnapshotBusy,
    #[error("snapshot from node {sender} has vote {vote}, older than this node's {local}")]
    StaleSnapshot { sender: NodeId, vote: String, local: String },
}

/// This node's Raft state, as far as judging a peer's message needs it.
#[derive(Clone, Debug)]
pub struct View {
    pub vote: Vote,
    pub leader: Option<NodeId>,
    pub voters: BTreeSet<NodeId>,
    pub members: BTreeSet<NodeId>,
}

impl View {
    /// The view of a node whose effective membership is `effective` and whose last committed
    /// one is `committed`: a sender may belong to either.
    pub fn new(
        vote: Vote,
        leader: Option<NodeId>,
        effective: &StoredMembership,
        committed: &StoredMembership,
    ) -> Self {
        let (mut voters, mut members) = (BTreeSet::new(), BTreeSet::new());
        for m in [effective.membership(), committed.membership()] {
            voters.extend(m.voter_ids());
            members.extend(m.nodes().map(|(id, _)| *id));
        }
        Self { vote, leader, voters, members }
    }

    pub fn term(&self) -> Term {
        self.vote.leader_id().term()
    }

    /// Not a member of any cluster yet: nothing to protect, and the first messages come from a
    /// leader this node cannot know.
    fn unformed(&self) -> bool {
        self.members.is_empty()
    }

    fn check_voter(&self, sender: NodeId, what: &'static str) -> Result<(), PeerRefusal> {
        if self.unformed() || self.voters.contains(&sender) {
            return Ok(());
        }
        Err(PeerRefusal::NotAVoter { sender, what })
    }

    fn check_term(&self, sender: NodeId, term: Term) -> Result<(), PeerRefusal> {
        let local = self.term();
        if term > local.saturating_add(MAX_TERM_STEP) {
            return Err(PeerRefusal::TermOutOfReach { sender, term, local });
        }
        Ok(())
    }

    /// A vote or pre-vote request from the candidate of `vote`.
    pub fn check_vote(&self, vote: &Vote) -> Result<(), PeerRefusal> {
        let sender = *vote.leader_id().node_id();
        self.check_voter(sender, "stand for election")?;
        self.check_term(sender, vote.leader_id().term())
    }

    /// Replication (AppendEntries) or a snapshot from the leader of `vote`.
    pub fn check_leader(&self, vote: &Vote) -> Result<(), PeerRefusal> {
        let sender = *vote.leader_id().node_id();
        self.check_voter(sender, "lead")?;
        self.check_term(sender, vote.leader_id().term())
    }

    /// A snapshot from the leader of `vote`: as [`Self::check_leader`], and not older than
    /// this node's vote (openraft would refuse it, but only after the whole file arrived).
    pub fn check_snapshot(&self, vote: &Vote) -> Result<(), PeerRefusal> {
        self.check_leader(vote)?;
        if vote.leader_id().term() < self.term() {
            return Err(PeerRefusal::StaleSnapshot {
                sender: *vote.leader_id().node_id(),
                vote: vote.to_string(),
                local: self.vote.to_string(),
            });
        }
        Ok(())
    }

    /// A request that member `sender` forwards to this node as the leader.
    pub fn check_forward(&self, sender: NodeId) -> Result<(), PeerRefusal> {
        if self.unformed() || self.members.contains(&sender) {
            return Ok(());
        }
        Err(PeerRefusal::NotAMember { sender })
    }

    /// A `TransferLeader` message: it must come from the leader this node follows, at its term
    /// (openraft ignores any other, but only after the transfer flag was granted).
    pub fn check_transfer(&self, from_leader: &Vote) -> Result<(), PeerRefusal> {
        let sender = *from_leader.leader_id().node_id();
        let term = from_leader.leader_id().term();
        if self.leader == Some(sender) && term == self.term() && self.voters.contains(&sender) {
            return Ok(());
        }
        Err(PeerRefusal::TransferNotFromLeader { sender, term, leader: self.leader, local: self.term() })
    }
}

/// A leadership transfer this node's leader announced: `to` may campaign with the transfer flag
/// for a term above `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub term: Term,
    pub to: NodeId,
}

/// Whether a vote request for `vote` may keep its `leadership_transfer` flag: only the candidate
/// the leader named, campaigning for a later term.
pub fn transfer_authorized(announced: Option<Transfer>, vote: &Vote) -> bool {
    announced.is_some_and(|t| *vote.leader_id().node_id() == t.to && vote.leader_id().term() > t.term)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::Membership;
    use crate::types::NodeInfo;

    fn vote(term: Term, node: NodeId) -> Vote {
        Vote::new(term, node)
    }

    fn view(voters: &[NodeId], learners: &[NodeId], term: Term, leader: Option<NodeId>) -> View {
        let membership = if voters.is_empty() {
            Membership::default()
        } else {
            let nodes: BTreeMap<NodeId, NodeInfo> =
                voters.iter().chain(learners).map(|id| (*id, NodeInfo::default())).collect();
            let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
            Membership::new(vec![voters], nodes).expect("a valid membership")
        };
        let stored = StoredMembership::new(None, membership);
        View::new(vote(term, leader.unwrap_or(1)), leader, &stored, &stored)
    }

    #[test]
    fn only_voters_vote_and_lead() {
        let v = view(&[1, 2, 3], &[4], 5, Some(1));
        assert_eq!(Ok(()), v.check_vote(&vote(6, 2)));
        assert_eq!(Ok(()), v.check_leader(&vote(5, 1)));
        assert!(matches!(v.check_vote(&vote(6, 4)), Err(PeerRefusal::NotAVoter { sender: 4, .. })));
        assert!(matches!(v.check_vote(&vote(6, 99)), Err(PeerRefusal::NotAVoter { sender: 99, .. })));
        assert!(matches!(v.check_leader(&vote(6, 99)), Err(PeerRefusal::NotAVoter { .. })));
    }

    #[test]
    fn learners_and_voters_forward_strangers_do_not() {
        let v = view(&[1, 2, 3], &[4], 5, Some(1));
        assert_eq!(Ok(()), v.check_forward(4));
        assert_eq!(Ok(()), v.check_forward(2));
        assert_eq!(Err(PeerRefusal::NotAMember { sender: 7 }), v.check_forward(7));
    }

    #[test]
    fn an_unformed_node_takes_messages_from_anyone() {
        let v = view(&[], &[], 0, None);
        assert_eq!(Ok(()), v.check_vote(&vote(1, 7)));
        assert_eq!(Ok(()), v.check_leader(&vote(1, 7)));
        assert_eq!(Ok(()), v.check_forward(7));
    }

    #[test]
    fn a_term_out_of_reach_is_refused_even_unformed() {
        for v in [view(&[1, 2, 3], &[], 5, Some(1)), view(&[], &[], 0, None)] {
            let local = v.term();
            assert_eq!(Ok(()), v.check_vote(&vote(local + MAX_TERM_STEP, 2)));
            for term in [local + MAX_TERM_STEP + 1, u64::MAX, u64::MAX - 1] {
                assert!(
                    matches!(v.check_vote(&vote(term, 2)), Err(PeerRefusal::TermOutOfReach { .. })),
                    "term {term}"
                );
                assert!(matches!(v.check_leader(&vote(term, 2)), Err(PeerRefusal::TermOutOfReach { .. })));
            }
        }
        let high = view(&[1, 2, 3], &[], u64::MAX - 3, Some(1));
        assert_eq!(Ok(()), high.check_vote(&vote(u64::MAX, 2)), "no overflow near the top");
    }

    #[test]
    fn a_snapshot_from_an_older_term_is_refused_before_any_byte() {
        let v = view(&[1, 2, 3], &[], 5, Some(1));
        assert!(matches!(v.check_snapshot(&vote(4, 1)), Err(PeerRefusal::StaleSnapshot { .. })));
        assert_eq!(Ok(()), v.check_snapshot(&vote(5, 1)));
        assert_eq!(Ok(()), v.check_snapshot(&vote(6, 2)));
    }

    #[test]
    fn transfers_come_only_from_the_known_leader_at_its_term() {
        let v = view(&[1, 2, 3], &[], 5, Some(1));
        assert_eq!(Ok(()), v.check_transfer(&vote(5, 1)));
        assert!(v.check_transfer(&vote(5, 2)).is_err(), "not the leader");
        assert!(v.check_transfer(&vote(4, 1)).is_err(), "an old term");
        assert!(v.check_transfer(&vote(6, 1)).is_err(), "a term this node has not seen");
        assert!(view(&[1, 2, 3], &[], 5, None).check_transfer(&vote(5, 1)).is_err(), "no leader known");
    }

    #[test]
    fn the_transfer_flag_holds_only_for_the_named_candidate_at_a_later_term() {
        let announced = Some(Transfer { term: 5, to: 2 });
        assert!(transfer_authorized(announced, &vote(6, 2)));
        assert!(!transfer_authorized(announced, &vote(6, 3)), "another candidate");
        assert!(!transfer_authorized(announced, &vote(5, 2)), "not a new term");
        assert!(!transfer_authorized(None, &vote(6, 2)), "nothing announced");
    }
}
