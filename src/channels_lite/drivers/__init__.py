"""Storage drivers and their discovery. Drivers persist bytes; the core owns every policy."""

from .base import (
    ChangeNotifier,
    Claimed,
    ClaimRequest,
    ClaimsReady,
    DefersChanges,
    Driver,
    DriverConfigError,
    DriverError,
    DriverFeatures,
    Envelope,
    StorageStats,
    SupportsLiveness,
    SupportsStats,
)

__all__ = [
    "ChangeNotifier",
    "ClaimRequest",
    "Claimed",
    "ClaimsReady",
    "DefersChanges",
    "Driver",
    "DriverConfigError",
    "DriverError",
    "DriverFeatures",
    "Envelope",
    "StorageStats",
    "SupportsLiveness",
    "SupportsStats",
]
