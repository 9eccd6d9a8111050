"""
The slot policy alone: events in, steps out -- no reactor, no clock, no SSH.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from gateway.cluster.slots import MAX_BACKOFF, SlotPolicy, Step, backoff_delay


def top() -> float:
    """The top of the jitter range: delays come out exact."""
    return 1.0


class BackoffTests(TestCase):
    def test_doubling_capped_with_jitter(self):
        delays = [backoff_delay(n, jitter=lambda: 0.999999) for n in range(1, 10)]
        self.assertEqual([round(d, 2) for d in delays], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(backoff_delay(1, jitter=lambda: 0.0), 0.25)


class RotationTests(TestCase):
    def test_slots_prefer_their_own_candidate(self):
        self.assertEqual([SlotPolicy(i, 3, top).candidate for i in range(5)], [0, 1, 2, 0, 1])

    def test_each_failure_moves_to_the_next_candidate_on_a_doubling_back_off(self):
        policy = SlotPolicy(0, 2, top)
        steps = [policy.attempt_failed() for _ in range(8)]
        self.assertEqual(
            steps,
            [Step("connect", n % 2, min(MAX_BACKOFF, 0.5 * 2 ** (n - 1))) for n in range(1, 9)],
        )

    def test_a_lost_link_counts_like_a_failed_attempt(self):
        policy = SlotPolicy(1, 3, top)
        self.assertEqual(policy.attempt_failed(), Step("connect", 2, 0.5))
        self.assertEqual(policy.link_lost(), Step("connect", 0, 1.0))

    def test_a_link_up_resets_the_back_off(self):
        policy = SlotPolicy(0, 1, top)
        policy.attempt_failed()
        policy.attempt_failed()
        self.assertIsNone(policy.link_up())
        self.assertEqual(policy.link_lost(), Step("connect", 0, 0.5))

    def test_jitter_scales_each_delay_down_to_half(self):
        policy = SlotPolicy(0, 2, lambda: 0.0)
        self.assertEqual(policy.attempt_failed().delay, 0.25)


class FailbackTests(TestCase):
    def on_fallback(self) -> SlotPolicy:
        policy = SlotPolicy(0, 2, top)
        policy.attempt_failed()
        return policy

    def test_up_on_the_preferred_candidate_nothing_to_probe(self):
        self.assertIsNone(SlotPolicy(1, 2, top).link_up())

    def test_up_on_a_fallback_the_preferred_candidate_is_probed_on_its_own_back_off(self):
        policy = self.on_fallback()
        self.assertTrue(policy.on_fallback)
        self.assertEqual(policy.link_up(), Step("probe", 0, 0.5))
        self.assertEqual([policy.probe_failed() for _ in range(3)], [Step("probe", 0, d) for d in (1.0, 2.0, 4.0)])
        self.assertEqual(policy.candidate, 1)

    def test_a_probe_that_answers_moves_the_slot_back(self):
        policy = self.on_fallback()
        policy.link_up()
        policy.probe_failed()
        policy.probe_succeeded()
        self.assertEqual((policy.candidate, policy.on_fallback), (0, False))
        # The next loss rotates on from the preferred candidate; a later
        # fallback probes from the start of the back-off again.
        self.assertEqual(policy.link_lost(), Step("connect", 1, 0.5))
        self.assertEqual(policy.link_up(), Step("probe", 0, 0.5))

    def test_probe_back_off_is_not_reset_by_a_reconnect(self):
        # Today's behaviour: a fallback that is lost and comes up again goes
        # on probing where its back-off was.
        policy = self.on_fallback()
        policy.link_up()
        policy.probe_failed()
        policy.link_lost()  # back on candidate 0
        policy.link_lost()  # and on the fallback again
        self.assertEqual(policy.link_up(), Step("probe", 0, 2.0))
