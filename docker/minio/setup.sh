#!/bin/sh
# The compose stack's minio-init job: buckets, access keys and their policies. Idempotent: safe on
# every `docker compose up`.
#
#   IMAGE_BUCKET     images (RAW_PREFIX: training data, INCOMING_PREFIX: images to score) and the
#                    pipeline's own objects (WORK_PREFIX, PREDICTIONS_PREFIX)
#   ARTIFACT_BUCKET  MLflow's artifacts; only the MLflow server's key can reach it
#
# One access key per job, each with a policy from policies/ beside this script:
#   S3_ACCESS_KEY           Airflow (connection aws_default)  leukemia-pipeline.json
#   MLFLOW_S3_ACCESS_KEY    the MLflow server                  leukemia-mlflow.json
#   S3_UPLOADER_ACCESS_KEY  whoever adds images                leukemia-uploader.json
# The policies are templates: @NAME@ is replaced by the variable NAME of this job's environment.
#
# POSIX sh and shell built-ins only: the minio/mc image has no sed or grep.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${POLICY_DIR:=${0%/*}/policies}"
: "${RENDER_DIR:=/tmp}"

fail() {
    printf 'minio-init: %s\n' "$1" >&2
    exit 1
}

for name in MINIO_ROOT_USER MINIO_ROOT_PASSWORD IMAGE_BUCKET ARTIFACT_BUCKET RAW_PREFIX \
    INCOMING_PREFIX WORK_PREFIX PREDICTIONS_PREFIX S3_ACCESS_KEY S3_SECRET_KEY \
    MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY S3_UPLOADER_ACCESS_KEY S3_UPLOADER_SECRET_KEY; do
    eval "value=\${$name-}"
    [ -n "$value" ] || fail "$name is empty: set it in .env (see .env.example)"
done
for name in RAW_PREFIX INCOMING_PREFIX WORK_PREFIX PREDICTIONS_PREFIX; do
    eval "value=\${$name}"
    case $value in
        */) ;;
        *) fail "$name=$value must end with '/': a policy on '$value*' would also match '${value}x/'" ;;
    esac
done

# replace TEXT PLACEHOLDER VALUE: every PLACEHOLDER in TEXT replaced by VALUE, into $replaced.
replace() {
    replaced=
    rest=$1
    while :; do
        case $rest in
            *"$2"*)
                replaced=$replaced${rest%%"$2"*}$3
                rest=${rest#*"$2"}
                ;;
            *) break ;;
        esac
    done
    replaced=$replaced$rest
}

# render NAME: policies/NAME.json with its @VARIABLES@ filled in, written to $RENDER_DIR/NAME.json.
render() {
    text=
    while IFS= read -r line || [ -n "$line" ]; do
        for var in IMAGE_BUCKET ARTIFACT_BUCKET RAW_PREFIX INCOMING_PREFIX WORK_PREFIX \
            PREDICTIONS_PREFIX; do
            eval "value=\${$var}"
            replace "$line" "@$var@" "$value"
            line=$replaced
        done
        case $line in
            *@[A-Z]*@*) fail "$1.json: unknown placeholder in: $line" ;;
        esac
        text="$text$line
"
    done <"$POLICY_DIR/$1.json"
    printf '%s' "$text" >"$RENDER_DIR/$1.json"
}

# attach POLICY USER: `mc admin policy attach`, which fails when the policy is attached already.
attach() {
    if ! out=$(mc admin policy attach local "$1" --user "$2" 2>&1); then
        case $out in
            *"already in effect"*) ;;
            *) fail "cannot attach policy $1 to $2: $out" ;;
        esac
    fi
}

# account USER SECRET POLICY: the key exists with this secret and exactly this one policy.
account() {
    render "$3"
    mc admin policy create local "$3" "$RENDER_DIR/$3.json"
    mc admin user add local "$1" "$2"
    # Stacks set up before the policies existed gave the pipeline's key `readwrite`.
    mc admin policy detach local readwrite --user "$1" >/dev/null 2>&1 || true
    attach "$3" "$1"
    echo "minio-init: $1 has policy $3"
}

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/${IMAGE_BUCKET}"
mc mb --ignore-existing "local/${ARTIFACT_BUCKET}"
account "$S3_ACCESS_KEY" "$S3_SECRET_KEY" leukemia-pipeline
account "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" leukemia-mlflow
account "$S3_UPLOADER_ACCESS_KEY" "$S3_UPLOADER_SECRET_KEY" leukemia-uploader
echo "minio-init: buckets ready: ${IMAGE_BUCKET} ${ARTIFACT_BUCKET}"
