from gateway.store.db import App, AppKey, DynoRecord, Release, Store, StoreError

__all__ = ["App", "AppKey", "DynoRecord", "Release", "Store", "StoreError"]
