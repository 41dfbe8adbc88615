DESCRIPTION = "A Docker manifest list by tag only (tag 'latest' by default; resolved when fetched)"
inherit dpkg-base
SRC_URI = "docker://${FETCHD_TEST_REGISTRY}/fetchd-test/multi-docker"
BB_STRICT_CHECKSUM = "ignore"
