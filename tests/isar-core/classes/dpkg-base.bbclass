# The part of Isar's dpkg-base.bbclass that matters here: on every recipe parse its
# anonymous python *appends* Isar's own docker:// fetcher to bb.fetch2.methods.
# The fetcher is a stand-in (lib/container_fetcher.py) that fails loudly if it is ever
# chosen: fetchd's method, at the front of the list, must win every time.

python () {
    import container_fetcher
    from bb.fetch2 import methods

    methods.append(container_fetcher.Container())
}
