"""fetchd: a local daemon that brings container images into embedded Linux builds.

Module map (dependencies point downwards only; see docs/DESIGN.md):

    pure, stdlib only   errors  digest  reference  platform  manifest  config
    I/O, one concern    auth  registry_async  layer_store  pack  deliver
    meeting point       pull
    wiring              server  cli
"""

__version__ = "0.1.0"
