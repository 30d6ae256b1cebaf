from gateway.store.db import App, AppKey, Dyno, Release, Store, StoreError

__all__ = ["App", "AppKey", "Dyno", "Release", "Store", "StoreError"]
