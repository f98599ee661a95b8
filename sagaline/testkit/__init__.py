"""Testing sagas on the real engine, in one process, in virtual time (the pytest
plugin's fixtures are built from these): `SagaEnv`, faults, mocks, assertions,
`explore_failures`."""

from .assertions import History, assert_compensated, assert_completed, history
from .clock import VirtualClock, parse_duration
from .env import SagaEnv
from .explore import ExploreReport, Scenario, explore_failures
from .faults import Faults, InjectedFailure, SimulatedCrash
from .messages import BodyRun, Delivery, Message
from .mocks import StepMock

__all__ = [
    # the environment
    "SagaEnv",
    "VirtualClock",
    "parse_duration",
    "Message",
    "Delivery",
    "BodyRun",
    # injecting
    "Faults",
    "SimulatedCrash",
    "InjectedFailure",
    "StepMock",
    # checking
    "History",
    "history",
    "assert_completed",
    "assert_compensated",
    "explore_failures",
    "ExploreReport",
    "Scenario",
]
