DESCRIPTION = "An OCI index whose per-platform base layers are also container-app-b's"
inherit dpkg-base
SRC_URI = "docker://${FETCHD_TEST_REGISTRY}/fetchd-bb/app-a;digest=${FETCHD_TEST_DIGEST_app_a};tag=v1"
