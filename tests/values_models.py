"""Types for the typed-value tests.

They live in a module of their own, imported by name in every process. A class defined in a
test module would be pickled by value as soon as a deployment from that module is deployed
(broker_serve/client/build.py, `pickle_user_module_by_value`), and would then never travel typed.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, RootModel


class Reading(BaseModel):
    sensor: str
    window: tuple[int, int]
    threshold: float = Field(default=0.0, ge=0)
    tags: dict[str, list[str]] = {}


class Report(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    reading: Reading
    peak: float
    samples: Any = None  # a numpy array: numpy is optional, so not in the annotation


class Priced(BaseModel):
    name: str
    price: decimal.Decimal
    when: datetime.datetime


class Order(BaseModel):
    item: Priced
    quantity: int


class Aliased(BaseModel):
    first_name: str = Field(alias="firstName")


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class WithPrivate(BaseModel):
    name: str
    _cache: dict[str, int] = PrivateAttr(default_factory=dict)


class Names(RootModel[list[str]]):
    pass


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclasses.dataclass
class Batch:
    spans: list[Span]
    reading: Reading
    weights: Any = None


@dataclasses.dataclass
class Derived:
    values: list[int]
    total: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.values)


@dataclasses.dataclass
class WithInitVar:
    scale: dataclasses.InitVar[int]
    value: int = 0

    def __post_init__(self, scale: int) -> None:
        self.value *= scale
