"""Two different sagas with one name: importing this module raises DefinitionError."""

from __future__ import annotations

from sagaline import Saga

first = Saga("hostile_clash").add_step("t.s1", no_compensation=True)
second = Saga("hostile_clash").add_step("t.s2", no_compensation=True)
