//! Topology changes by two-phase commit with a compare-and-set on the membership
//! epoch (DESIGN section 5), sans-IO like [`crate::sync`].
//!
//! The coordinator — the appliance an administrator's change reached — runs a
//! [`TopologyChange`]: it sends `TopologyPrepare { expected_epoch, new_epoch, topology }`
//! to every appliance of the proposed topology (itself included: the driver delivers
//! that one locally), waits for every vote, then sends `TopologyCommit` if all accepted
//! and `TopologyAbort` otherwise. A missing vote by the deadline refuses the change,
//! naming the appliances that did not answer: the product requires every appliance
//! online for a change. Each appliance runs a [`Membership`]: it accepts a prepare only
//! if its current epoch is the expected one and nothing else is prepared, so of two
//! concurrent changes at most one can win (each appliance votes for one), and a change
//! made from a stale view is refused. A prepared change that is neither committed nor
//! aborted expires, so a coordinator that died does not block membership forever.

use std::collections::BTreeMap;

use repl_wire::{NodeId, PeerMessage};

use crate::topology::Topology;

/// How long a prepared change waits for its commit before it lapses.
pub const PREPARED_LAPSE_MS: u64 = 30_000;

/// One appliance's membership: the current topology and a prepared change, if any.
#[derive(Debug, Clone)]
pub struct Membership {
    current: Topology,
    prepared: Option<(Topology, u64)>,
    /// A new appliance waiting to be added: it accepts a change that adds it whatever
    /// the epoch it was made against (it has no view of its own to protect).
    joining: Option<NodeId>,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// The proposed topology does not validate.
    #[error("the proposed topology is invalid: {0}")]
    Invalid(String),
    /// Some appliances did not vote in time.
    #[error("every appliance must be online for a topology change; no answer from {}", names(.0))]
    Unreachable(Vec<NodeId>),
    /// An appliance refused (another change won, or its epoch differs).
    #[error("{appliance} refused the change: {reason}")]
    Refused {
        /// Who refused.
        appliance: NodeId,
        /// Why.
        reason: String,
    },
}

fn names(ids: &[NodeId]) -> String {
    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl Membership {
    /// Membership starting from `current`.
    pub fn new(current: Topology) -> Membership {
        Membership { current, prepared: None, joining: None }
    }

    /// Membership of appliance `me`, not yet in `current`, waiting to be added.
    pub fn joining(current: Topology, me: NodeId) -> Membership {
        Membership { current, prepared: None, joining: Some(me) }
    }

    /// The committed topology.
    pub fn current(&self) -> &Topology {
        &self.current
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.current.epoch
    }

    /// Handles a prepare and returns the vote to send back.
    pub fn on_prepare(
        &mut self,
        now_ms: u64,
        expected_epoch: u64,
        new_epoch: u64,
        topology: &[u8],
    ) -> PeerMessage {
        let vote = |accept: bool, reason: String| PeerMessage::TopologyVote { new_epoch, accept, reason };
        if let Some((_, at)) = &self.prepared {
            if now_ms >= at + PREPARED_LAPSE_MS {
                self.prepared = None;
            }
        }
        let proposed: Topology = match postcard::from_bytes(topology) {
            Ok(t) => t,
            Err(e) => return vote(false, format!("the proposed topology does not decode: {e}")),
        };
        let adds_me = self.joining.as_ref().is_some_and(|me| proposed.appliance(me).is_some());
        if self.current.epoch != expected_epoch && !adds_me {
            return vote(false, format!("the epoch here is {}, not {expected_epoch}", self.current.epoch));
        }
        if proposed.epoch != new_epoch || new_epoch != expected_epoch + 1 {
            return vote(false, format!("epoch {new_epoch} does not follow {expected_epoch}"));
        }
        let validation = proposed.validate();
        if !validation.is_ok() {
            return vote(false, format!("the proposed topology is invalid: {:?}", validation.errors));
        }
        match &self.prepared {
            Some((p, _)) if *p != proposed => {
                vote(false, format!("another change to epoch {} is being committed", p.epoch))
            }
            _ => {
                self.prepared = Some((proposed, now_ms));
                vote(true, String::new())
            }
        }
    }

    /// Handles a commit: returns the topology that became current, if this appliance
    /// had prepared it.
    pub fn on_commit(&mut self, new_epoch: u64) -> Option<&Topology> {
        match self.prepared.take() {
            Some((t, _)) if t.epoch == new_epoch => {
                self.current = t;
                self.joining = None;
                Some(&self.current)
            }
            other => {
                self.prepared = other;
                None
            }
        }
    }

    /// Handles an abort: forgets the prepared change of that epoch.
    pub fn on_abort(&mut self, new_epoch: u64) {
        if self.prepared.as_ref().is_some_and(|(t, _)| t.epoch == new_epoch) {
            self.prepared = None;
        }
    }

    /// Handles the abort of one proposal (encoded as in its prepare): forgets the
    /// prepared change only if it is that proposal, so the abort of a change that
    /// lost does not undo the change that won here.
    pub fn on_abort_of(&mut self, topology: &[u8]) {
        let Ok(aborted) = postcard::from_bytes::<Topology>(topology) else { return };
        if self.prepared.as_ref().is_some_and(|(t, _)| *t == aborted) {
            self.prepared = None;
        }
    }

    /// Adopts a newer topology learned from a peer (its replicated record), when a
    /// handshake showed the epochs differ. Older or equal epochs are ignored.
    pub fn adopt(&mut self, topology: Topology) -> bool {
        if topology.epoch <= self.current.epoch || !topology.validate().is_ok() {
            return false;
        }
        if self.prepared.as_ref().is_some_and(|(t, _)| t.epoch <= topology.epoch) {
            self.prepared = None;
        }
        self.current = topology;
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vote {
    Waiting,
    Yes,
}

/// A change being coordinated.
#[derive(Debug)]
pub struct TopologyChange {
    proposed: Topology,
    expected_epoch: u64,
    votes: BTreeMap<NodeId, Vote>,
    transmit: Vec<(NodeId, PeerMessage)>,
    deadline_ms: u64,
    outcome: Option<Result<Topology, ChangeError>>,
}

impl TopologyChange {
    /// Starts changing `current` into `proposed` (whose epoch is set to the next one),
    /// giving every appliance until `now_ms + timeout_ms` to vote. Refused at once if
    /// the proposal does not validate.
    pub fn new(
        current: &Topology,
        mut proposed: Topology,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<TopologyChange, ChangeError> {
        proposed.epoch = current.epoch + 1;
        let validation = proposed.validate();
        if !validation.is_ok() {
            return Err(ChangeError::Invalid(format!("{:?}", validation.errors)));
        }
        let bytes = postcard::to_allocvec(&proposed).map_err(|e| ChangeError::Invalid(e.to_string()))?;
        let mut votes = BTreeMap::new();
        let mut transmit = Vec::new();
        for a in &proposed.appliances {
            votes.insert(a.id.clone(), Vote::Waiting);
            transmit.push((
                a.id.clone(),
                PeerMessage::TopologyPrepare {
                    expected_epoch: current.epoch,
                    new_epoch: proposed.epoch,
                    topology: bytes.clone(),
                },
            ));
        }
        Ok(TopologyChange {
            proposed,
            expected_epoch: current.epoch,
            votes,
            transmit,
            deadline_ms: now_ms + timeout_ms,
            outcome: None,
        })
    }

    /// The epoch the change was made against.
    pub fn expected_epoch(&self) -> u64 {
        self.expected_epoch
    }

    /// Next message to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, PeerMessage)> {
        if self.transmit.is_empty() {
            None
        } else {
            Some(self.transmit.remove(0))
        }
    }

    /// When to call [`TopologyChange::handle_timeout`], while votes are awaited.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.outcome.is_none().then_some(self.deadline_ms)
    }

    /// A vote from `from`.
    pub fn handle_vote(&mut self, from: &NodeId, new_epoch: u64, accept: bool, reason: String) {
        if self.outcome.is_some() || new_epoch != self.proposed.epoch {
            return;
        }
        let Some(v) = self.votes.get_mut(from) else { return };
        if !accept {
            self.finish(Err(ChangeError::Refused { appliance: from.clone(), reason }));
            return;
        }
        *v = Vote::Yes;
        if self.votes.values().all(|v| *v == Vote::Yes) {
            self.finish(Ok(self.proposed.clone()));
        }
    }

    /// The deadline passed: the appliances that did not vote make the change fail.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.outcome.is_none() && now_ms >= self.deadline_ms {
            let missing: Vec<NodeId> =
                self.votes.iter().filter(|(_, v)| **v == Vote::Waiting).map(|(id, _)| id.clone()).collect();
            self.finish(Err(ChangeError::Unreachable(missing)));
        }
    }

    fn finish(&mut self, outcome: Result<Topology, ChangeError>) {
        let new_epoch = self.proposed.epoch;
        let message = match outcome {
            Ok(_) => PeerMessage::TopologyCommit { new_epoch },
            Err(_) => PeerMessage::TopologyAbort { new_epoch },
        };
        for id in self.votes.keys() {
            self.transmit.push((id.clone(), message.clone()));
        }
        self.outcome = Some(outcome);
    }

    /// The result, once decided: the committed topology or why it was refused.
    pub fn outcome(&self) -> Option<&Result<Topology, ChangeError>> {
        self.outcome.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::{appliance, g3};
    use crate::topology::Role;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    /// Delivers the coordinator's messages to the members (those in `down` get
    /// nothing) and their votes back; returns the members' committed epochs.
    fn run(
        change: &mut TopologyChange,
        members: &mut BTreeMap<NodeId, Membership>,
        down: &[&str],
        now_ms: u64,
    ) {
        while let Some((to, m)) = change.poll_transmit() {
            if down.contains(&to.as_str()) {
                continue;
            }
            let Some(member) = members.get_mut(&to) else { continue };
            match m {
                PeerMessage::TopologyPrepare { expected_epoch, new_epoch, topology } => {
                    if let PeerMessage::TopologyVote { new_epoch, accept, reason } =
                        member.on_prepare(now_ms, expected_epoch, new_epoch, &topology)
                    {
                        change.handle_vote(&to, new_epoch, accept, reason);
                    }
                }
                PeerMessage::TopologyCommit { new_epoch } => {
                    member.on_commit(new_epoch);
                }
                PeerMessage::TopologyAbort { new_epoch } => member.on_abort(new_epoch),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn members(t: &Topology) -> BTreeMap<NodeId, Membership> {
        let mut m: BTreeMap<NodeId, Membership> =
            t.appliances.iter().map(|a| (a.id.clone(), Membership::new(t.clone()))).collect();
        // The appliance being added starts from the same view.
        m.insert(id("a3"), Membership::new(t.clone()));
        m
    }

    fn with_a3(t: &Topology) -> Topology {
        let mut p = t.clone();
        p.appliances.push(appliance("a3", "a", &[]));
        p
    }

    #[test]
    fn a_change_commits_on_every_appliance_and_raises_the_epoch() {
        let t = g3();
        let mut ms = members(&t);
        let mut change = TopologyChange::new(&t, with_a3(&t), 0, 1_000).expect("valid");
        run(&mut change, &mut ms, &[], 0);
        let committed = change.outcome().expect("decided").as_ref().expect("committed").clone();
        assert_eq!(committed.epoch, 2);
        for m in ms.values() {
            assert_eq!(m.current(), &committed);
        }
    }

    #[test]
    fn removing_an_appliance_needs_only_the_remaining_ones_and_leaves_it_out_of_every_scope() {
        let t = with_a3(&g3());
        let mut ms: BTreeMap<NodeId, Membership> =
            t.appliances.iter().map(|a| (a.id.clone(), Membership::new(t.clone()))).collect();
        let mut smaller = t.clone();
        smaller.appliances.retain(|a| a.id.as_str() != "a2");
        // a2 is already gone: the change still commits on the others.
        let mut change = TopologyChange::new(&t, smaller, 0, 1_000).expect("valid");
        run(&mut change, &mut ms, &["a2"], 0);
        let committed = change.outcome().expect("decided").as_ref().expect("committed").clone();
        let a1 = ms.get(&id("a1")).expect("a1").current().clone();
        assert_eq!(a1, committed);
        // Sessions to a2 close: no stream is in scope with it any more.
        let scope = a1.scope(&id("a1"), &id("a2"));
        assert!(scope.send.is_empty() && scope.receive.is_empty());
        assert_eq!(ms.get(&id("a2")).expect("a2").epoch(), 1, "the removed appliance was not asked");
    }

    #[test]
    fn an_unreachable_appliance_refuses_the_change_by_name_and_nothing_changes() {
        let t = g3();
        let mut ms = members(&t);
        let mut change = TopologyChange::new(&t, with_a3(&t), 0, 1_000).expect("valid");
        run(&mut change, &mut ms, &["b2"], 0);
        assert!(change.outcome().is_none(), "waits for b2");
        assert_eq!(change.poll_timeout(), Some(1_000));
        change.handle_timeout(1_000);
        run(&mut change, &mut ms, &["b2"], 1_000);
        match change.outcome() {
            Some(Err(e @ ChangeError::Unreachable(ids))) => {
                assert_eq!(ids, &vec![id("b2")]);
                assert!(e.to_string().contains("b2"), "{e}");
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert!(ms.values().all(|m| m.epoch() == 1));
        // The abort released the prepared change: a new one goes through at once.
        let mut again = TopologyChange::new(&t, with_a3(&t), 2_000, 1_000).expect("valid");
        run(&mut again, &mut ms, &[], 2_000);
        assert!(matches!(again.outcome(), Some(Ok(_))));
    }

    #[test]
    fn of_two_concurrent_changes_one_wins_and_the_other_is_refused() {
        let t = g3();
        let mut ms = members(&t);
        let mut add = TopologyChange::new(&t, with_a3(&t), 0, 1_000).expect("valid");
        let mut rename = t.clone();
        rename.sites[1].name = "Berlin".into();
        let mut rename = TopologyChange::new(&t, rename, 0, 1_000).expect("valid");
        // Interleave: each coordinator's prepares reach the members alternately.
        let mut queue: Vec<(bool, NodeId, PeerMessage)> = Vec::new();
        loop {
            let a = add.poll_transmit().map(|(to, m)| (true, to, m));
            let r = rename.poll_transmit().map(|(to, m)| (false, to, m));
            if a.is_none() && r.is_none() {
                break;
            }
            queue.extend(r);
            queue.extend(a);
        }
        for (is_add, to, m) in queue {
            let member = ms.get_mut(&to).expect("member");
            if let PeerMessage::TopologyPrepare { expected_epoch, new_epoch, topology } = m {
                if let PeerMessage::TopologyVote { new_epoch, accept, reason } =
                    member.on_prepare(0, expected_epoch, new_epoch, &topology)
                {
                    let c = if is_add { &mut add } else { &mut rename };
                    c.handle_vote(&to, new_epoch, accept, reason);
                }
            }
        }
        let won = [add.outcome(), rename.outcome()].iter().filter(|o| matches!(o, Some(Ok(_)))).count();
        let refused = [add.outcome(), rename.outcome()]
            .iter()
            .filter(|o| matches!(o, Some(Err(ChangeError::Refused { .. }))))
            .count();
        assert!(won <= 1 && refused >= 1, "won {won}, refused {refused}");
        // A change made from the old view after another committed loses the compare-and-set.
        let mut fresh = members(&t);
        let mut first = TopologyChange::new(&t, with_a3(&t), 0, 1_000).expect("valid");
        run(&mut first, &mut fresh, &[], 0);
        let mut stale = TopologyChange::new(&t, g3(), 10, 1_000).expect("valid");
        run(&mut stale, &mut fresh, &[], 10);
        match stale.outcome() {
            Some(Err(ChangeError::Refused { reason, .. })) => {
                assert!(reason.contains("epoch here is 2"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_invalid_proposal_is_refused_before_anything_is_sent_and_a_lapsed_prepare_frees_the_epoch() {
        let t = g3();
        let mut bad = t.clone();
        for a in &mut bad.appliances {
            a.roles.remove(&Role::Audit);
        }
        assert!(matches!(TopologyChange::new(&t, bad, 0, 1_000), Err(ChangeError::Invalid(_))));

        let mut m = Membership::new(t.clone());
        let mut p = with_a3(&t);
        p.epoch = 2;
        let bytes = postcard::to_allocvec(&p).expect("encode");
        assert!(matches!(m.on_prepare(0, 1, 2, &bytes), PeerMessage::TopologyVote { accept: true, .. }));
        let mut other = t.clone();
        other.sites[0].name = "Paris".into();
        other.epoch = 2;
        let other = postcard::to_allocvec(&other).expect("encode");
        assert!(matches!(m.on_prepare(10, 1, 2, &other), PeerMessage::TopologyVote { accept: false, .. }));
        // Its coordinator died: after the lapse the other change may prepare.
        assert!(matches!(
            m.on_prepare(PREPARED_LAPSE_MS, 1, 2, &other),
            PeerMessage::TopologyVote { accept: true, .. }
        ));
        assert!(m.on_commit(3).is_none());
        assert_eq!(m.on_commit(2).map(|t| t.sites[0].name.clone()), Some("Paris".to_string()));
    }

    #[test]
    fn a_joining_appliance_votes_only_for_the_change_that_adds_it() {
        let t = g3();
        let empty = Topology { appliances: Vec::new(), sites: Vec::new(), epoch: 0, ..t.clone() };
        let mut ms = members(&t);
        // a3 has no view (epoch 0): a plain member would refuse every prepare.
        ms.insert(id("a3"), Membership::joining(empty, id("a3")));
        let rename = {
            let mut p = t.clone();
            p.sites[0].name = "renamed".into();
            p
        };
        let bytes = postcard::to_allocvec(&Topology { epoch: t.epoch + 1, ..rename }).expect("encode");
        let vote = ms.get_mut(&id("a3")).expect("a3").on_prepare(0, t.epoch, t.epoch + 1, &bytes);
        assert!(matches!(vote, PeerMessage::TopologyVote { accept: false, .. }), "{vote:?}");
        let mut change = TopologyChange::new(&t, with_a3(&t), 0, 1_000).expect("valid");
        run(&mut change, &mut ms, &[], 0);
        assert!(matches!(change.outcome(), Some(Ok(_))), "{:?}", change.outcome());
        assert!(ms.values().all(|m| m.epoch() == t.epoch + 1));
        assert!(ms[&id("a3")].current().appliance(&id("a3")).is_some());
    }

    #[test]
    fn the_abort_of_a_losing_change_does_not_undo_the_winner() {
        let t = g3();
        let mut m = Membership::new(t.clone());
        let proposal = |name: &str| {
            let mut p = t.clone();
            p.sites[0].name = name.into();
            p.epoch = t.epoch + 1;
            postcard::to_allocvec(&p).expect("encode")
        };
        let (x, y) = (proposal("x"), proposal("y"));
        assert!(matches!(
            m.on_prepare(0, t.epoch, t.epoch + 1, &x),
            PeerMessage::TopologyVote { accept: true, .. }
        ));
        assert!(matches!(
            m.on_prepare(0, t.epoch, t.epoch + 1, &y),
            PeerMessage::TopologyVote { accept: false, .. }
        ));
        m.on_abort_of(&y);
        assert!(m.on_commit(t.epoch + 1).is_some(), "the losing change's abort undid the winner");
        assert_eq!(m.current().sites[0].name, "x");
    }
}
