"""The autoscaling policy, driven with a fake clock: up fast, down slowly, to and from zero."""

import pytest

from flowserve_instance_runtime import Autoscaler, LoadSample, ScalingPolicy


def sample(now, running=0, waiting=0, instances=1, ttft_p90=None):
    return LoadSample(now=now, running=running, waiting=waiting, instances=instances, ttft_p90=ttft_p90)


def test_demand_over_target_concurrency_scales_up_at_once_within_bounds():
    scaler = Autoscaler(ScalingPolicy(max_instances=5, target_concurrency=4))
    assert scaler.desired(sample(0, running=4, waiting=5, instances=1)) == 3
    assert scaler.desired(sample(10, running=40, instances=3)) == 5  # capped


def test_scale_up_cooldown_prevents_back_to_back_jumps():
    scaler = Autoscaler(ScalingPolicy(max_instances=64, target_concurrency=1, scale_up_cooldown=5))
    assert scaler.desired(sample(0, running=2, instances=1)) == 2
    assert scaler.desired(sample(1, running=8, instances=2)) == 2
    assert scaler.desired(sample(6, running=8, instances=2)) == 8


def test_scale_down_waits_for_the_delay_and_keeps_the_highest_recent_wish():
    scaler = Autoscaler(ScalingPolicy(max_instances=8, target_concurrency=1, scale_down_delay=30))
    assert scaler.desired(sample(0, running=2, instances=6)) == 6
    assert scaler.desired(sample(10, running=4, instances=6)) == 6
    assert scaler.desired(sample(20, running=1, instances=6)) == 6
    assert scaler.desired(sample(31, running=1, instances=6)) == 4


def test_load_that_comes_back_resets_the_scale_down_window():
    scaler = Autoscaler(ScalingPolicy(max_instances=8, target_concurrency=1, scale_down_delay=10))
    assert scaler.desired(sample(0, running=1, instances=4)) == 4
    assert scaler.desired(sample(5, running=4, instances=4)) == 4
    assert scaler.desired(sample(12, running=1, instances=4)) == 4
    assert scaler.desired(sample(23, running=1, instances=4)) == 1


def test_slo_breach_scales_faster():
    policy = ScalingPolicy(max_instances=16, target_concurrency=8, slo_ttft_seconds=1.0)
    scaler = Autoscaler(policy)
    assert scaler.desired(sample(0, running=8, instances=2, ttft_p90=0.5)) == 2
    assert scaler.desired(sample(5, running=8, instances=2, ttft_p90=3.0)) == 4


def test_idle_scales_to_zero_and_a_request_at_zero_asks_for_one():
    scaler = Autoscaler(ScalingPolicy(min_instances=1, max_instances=4, scale_to_zero_after=60))
    assert scaler.desired(sample(0, running=1, instances=1)) == 1
    assert scaler.desired(sample(30, instances=1)) == 1
    assert scaler.desired(sample(61, instances=1)) == 0
    assert scaler.desired(sample(62, waiting=1, instances=0)) == 1


def test_min_instances_hold_without_scale_to_zero():
    scaler = Autoscaler(ScalingPolicy(min_instances=2, max_instances=4, scale_down_delay=0))
    assert scaler.desired(sample(1000, instances=2)) == 2


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="target_concurrency"):
        ScalingPolicy(target_concurrency=0)
