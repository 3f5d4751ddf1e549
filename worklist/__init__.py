"""UPS-RS worklist (PS3.4 Annex CC, PS3.18 chapter 11): work items, their state machine, search,
subscriptions and the event outbox their WebSocket delivery reads. Stored in PostgreSQL (migration 0008).
"""
