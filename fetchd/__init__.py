"""fetchd: a local daemon that brings container images into embedded Linux builds.

Module map (dependencies point one way only; docs/DESIGN.md has the whole table):

    pure, stdlib only   errors  digest  reference  platform  manifest  config  archive_format
    I/O, one concern    auth/registry_http/registry_async   ingest/store_*/layer_store
                        decompress/pack   deliver
    meeting point       pull
    wiring              server  cli
"""

__version__ = "0.1.0"
