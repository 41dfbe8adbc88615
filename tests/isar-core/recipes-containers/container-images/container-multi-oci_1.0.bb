DESCRIPTION = "An OCI index for nine platforms (and an attestation), pinned by digest"
inherit dpkg-base
SRC_URI = "docker://${FETCHD_TEST_REGISTRY}/fetchd-test/multi-oci;digest=${FETCHD_TEST_DIGEST_multi_oci};tag=latest"
