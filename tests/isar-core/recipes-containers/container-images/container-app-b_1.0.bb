DESCRIPTION = "An OCI index whose per-platform base layers are also container-app-a's"
inherit dpkg-base
SRC_URI = "docker://${FETCHD_TEST_REGISTRY}/fetchd-bb/app-b;digest=${FETCHD_TEST_DIGEST_app_b};tag=v1"
