"""The history store: every round's global model and every client's update, encrypted and durable.

Importing this package never imports Flower: the store is plain SQLite, files
and AES-GCM, usable by audits and tools that have no federation running.
"""
