//! What a node believes of a peer's message, decided before openraft sees it.
//!
//! The peer port is a trust boundary: without peer TLS, anyone who reaches it can send any
//! message (`docs/security.md`). openraft trusts what it is handed, so Keel checks each message
//! here first, on a view of this node's own Raft state:
//!
//! - **Senders are members, as far as this node can know.** A vote or pre-vote must come from a
//!   voter, replication and snapshots from a voter (only a voter leads), a forwarded request from
//!   a member (voter or learner) — of the effective or the last committed membership, so that a
//!   change in progress cuts nobody off early. A node's view can lag the cluster's, though: a
//!   member that was down while others joined does not know the leader they elected, and a node
//!   being added replays old memberships before it reaches its own. Refusing those would keep it
//!   behind for good (found by keel-chaos' membership runs), so an unknown sender still passes
//!   where this node may be the one behind: a leader at a higher term than this node's, or the
//!   leader it already follows; a candidate whose log is longer than this node's; anyone, while
//!   this node is not in its own view (a fresh node, or one catching up to its own addition).
//!   What the check stops is a stranger that claims nothing newer than this node has.
//! - **Terms are reachable.** A term more than [`MAX_TERM_STEP`] above this node's is refused: no
//!   run of real elections gets there, and a term near `u64::MAX` would make the next election
//!   wrap (openraft then never elects again, or panics at start).
//! - **Leadership transfers come from the leader.** A vote request flagged `leadership_transfer`
//!   overrides the leader lease on the voter. The flag is honoured only for the candidate that
//!   this node's known leader named in a `TransferLeader` message; otherwise it is cleared, and
//!   the request is judged as an ordinary vote (the lease holds).
//!
//! The decisions are pure functions of a [`View`], so tests assert on values.

use std::sync::Arc;

use openraft::vote::RaftLeaderId;

use crate::types::LogId;
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

/// This node's Raft state, as far as judging a peer's message needs it. Built for every message:
/// it holds the memberships by `Arc`, and looks senders up in them without copying.
#[derive(Clone, Debug)]
pub struct View {
    /// This node.
    pub id: NodeId,
    pub vote: Vote,
    pub leader: Option<NodeId>,
    /// The last entry in this node's log.
    pub last_log: Option<LogId>,
    /// The effective and the last committed membership: a sender may belong to either.
    pub memberships: [Arc<StoredMembership>; 2],
}

impl View {
    pub fn new(
        id: NodeId,
        vote: Vote,
        leader: Option<NodeId>,
        last_log: Option<LogId>,
        effective: Arc<StoredMembership>,
        committed: Arc<StoredMembership>,
    ) -> Self {
        Self { id, vote, leader, last_log, memberships: [effective, committed] }
    }

    fn is_voter(&self, id: NodeId) -> bool {
        self.memberships.iter().any(|m| m.membership().voter_ids().any(|v| v == id))
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.memberships.iter().any(|m| m.membership().get_node(&id).is_some())
    }

    pub fn term(&self) -> Term {
        self.vote.leader_id().term()
    }

    /// This node is not in its own view: it is fresh (no membership yet), or it replays a log
    /// that has not reached its own addition. Its view says nothing about who leads now, and it
    /// holds nothing yet to protect.
    fn outside_own_view(&self) -> bool {
        !self.is_member(self.id)
    }

    fn check_term(&self, sender: NodeId, term: Term) -> Result<(), PeerRefusal> {
        let local = self.term();
        if term > local.saturating_add(MAX_TERM_STEP) {
            return Err(PeerRefusal::TermOutOfReach { sender, term, local });
        }
        Ok(())
    }

    /// A vote or pre-vote request from the candidate of `vote`, whose log ends at `last_log`.
    pub fn check_vote(&self, vote: &Vote, last_log: Option<&LogId>) -> Result<(), PeerRefusal> {
        let sender = *vote.leader_id().node_id();
        self.check_term(sender, vote.leader_id().term())?;
        // A candidate with entries this node lacks may be a voter of a membership among them.
        let may_know_more = last_log > self.last_log.as_ref();
        if self.is_voter(sender) || may_know_more || self.outside_own_view() {
            return Ok(());
        }
        Err(PeerRefusal::NotAVoter { sender, what: "stand for election" })
    }

    /// Replication (AppendEntries) or a snapshot from the leader of `vote`.
    pub fn check_leader(&self, vote: &Vote) -> Result<(), PeerRefusal> {
        let sender = *vote.leader_id().node_id();
        let term = vote.leader_id().term();
        self.check_term(sender, term)?;
        // A leader elected while this node was away has a higher term; once this node follows
        // it, it is `leader`.
        let newer = term > self.term();
        if self.is_voter(sender) || self.leader == Some(sender) || newer || self.outside_own_view() {
            return Ok(());
        }
        Err(PeerRefusal::NotAVoter { sender, what: "lead" })
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
    /// The leader's view is the cluster's: a member it does not know is no member.
    pub fn check_forward(&self, sender: NodeId) -> Result<(), PeerRefusal> {
        if self.is_member(sender) || self.outside_own_view() {
            return Ok(());
        }
        Err(PeerRefusal::NotAMember { sender })
    }

    /// A `TransferLeader` message: it must come from the leader this node follows, at its term
    /// (openraft ignores any other, but only after the transfer flag was granted).
    pub fn check_transfer(&self, from_leader: &Vote) -> Result<(), PeerRefusal> {
        let sender = *from_leader.leader_id().node_id();
        let term = from_leader.leader_id().term();
        if self.leader == Some(sender) && term == self.term() {
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
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::Membership;
    use crate::types::NodeInfo;

    fn vote(term: Term, node: NodeId) -> Vote {
        Vote::new(term, node)
    }

    fn log_id(term: Term, index: u64) -> LogId {
        LogId::new(
            <openraft::alias::LeaderIdOf<crate::types::KeelTypes> as RaftLeaderId>::new(term, 1)
                .to_committed(),
            index,
        )
    }

    /// Node 1's view, its log ending at (term, 10).
    fn view(voters: &[NodeId], learners: &[NodeId], term: Term, leader: Option<NodeId>) -> View {
        let membership = if voters.is_empty() {
            Membership::default()
        } else {
            let nodes: BTreeMap<NodeId, NodeInfo> =
                voters.iter().chain(learners).map(|id| (*id, NodeInfo::default())).collect();
            let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
            Membership::new(vec![voters], nodes).expect("a valid membership")
        };
        let stored = Arc::new(StoredMembership::new(None, membership));
        let last_log = Some(log_id(term, 10));
        View::new(1, vote(term, leader.unwrap_or(1)), leader, last_log, stored.clone(), stored)
    }

    #[test]
    fn voters_vote_and_lead_strangers_claiming_nothing_newer_do_not() {
        let v = view(&[1, 2, 3], &[4], 5, Some(1));
        let short = Some(log_id(5, 10));
        assert_eq!(Ok(()), v.check_vote(&vote(6, 2), short.as_ref()));
        assert_eq!(Ok(()), v.check_leader(&vote(5, 1)));
        assert!(matches!(
            v.check_vote(&vote(6, 4), short.as_ref()),
            Err(PeerRefusal::NotAVoter { sender: 4, .. })
        ));
        assert!(matches!(v.check_vote(&vote(6, 99), None), Err(PeerRefusal::NotAVoter { sender: 99, .. })));
        assert!(matches!(v.check_leader(&vote(5, 99)), Err(PeerRefusal::NotAVoter { .. })));
    }

    #[test]
    fn a_member_behind_the_membership_still_follows_a_leader_it_does_not_know() {
        // Node 1 was away while node 7 joined and was elected at term 9.
        let v = view(&[1, 2, 3], &[], 5, None);
        assert_eq!(Ok(()), v.check_leader(&vote(9, 7)), "a higher term: a leader elected meanwhile");
        assert_eq!(Ok(()), v.check_vote(&vote(9, 7), Some(&log_id(9, 50))), "a longer log");
        // Once it follows node 7, at node 7's term.
        let following = view(&[1, 2, 3], &[], 9, Some(7));
        assert_eq!(Ok(()), following.check_leader(&vote(9, 7)));
        assert!(following.check_leader(&vote(9, 8)).is_err(), "another stranger at the same term");
    }

    #[test]
    fn a_node_outside_its_own_view_takes_messages_from_anyone() {
        for v in [view(&[], &[], 0, None), view(&[2, 3, 4], &[], 3, Some(2))] {
            assert_eq!(Ok(()), v.check_vote(&vote(v.term() + 1, 7), None));
            assert_eq!(Ok(()), v.check_leader(&vote(v.term(), 7)));
            assert_eq!(Ok(()), v.check_forward(7));
        }
    }

    #[test]
    fn learners_and_voters_forward_strangers_do_not() {
        let v = view(&[1, 2, 3], &[4], 5, Some(1));
        assert_eq!(Ok(()), v.check_forward(4));
        assert_eq!(Ok(()), v.check_forward(2));
        assert_eq!(Err(PeerRefusal::NotAMember { sender: 7 }), v.check_forward(7));
    }

    #[test]
    fn a_term_out_of_reach_is_refused_whoever_asks() {
        for v in [view(&[1, 2, 3], &[], 5, Some(1)), view(&[], &[], 0, None)] {
            let local = v.term();
            assert_eq!(Ok(()), v.check_vote(&vote(local + MAX_TERM_STEP, 2), Some(&log_id(local, 99))));
            for term in [local + MAX_TERM_STEP + 1, u64::MAX, u64::MAX - 1] {
                let huge = Some(log_id(term, u64::MAX));
                assert!(
                    matches!(
                        v.check_vote(&vote(term, 2), huge.as_ref()),
                        Err(PeerRefusal::TermOutOfReach { .. })
                    ),
                    "term {term}"
                );
                assert!(matches!(v.check_leader(&vote(term, 2)), Err(PeerRefusal::TermOutOfReach { .. })));
            }
        }
        let high = view(&[1, 2, 3], &[], u64::MAX - 3, Some(1));
        assert_eq!(Ok(()), high.check_vote(&vote(u64::MAX, 2), None), "no overflow near the top");
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
