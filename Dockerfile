# GPU training image for neumf-trainer.
#   docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu -t IMAGE:TAG .
# Run arguments come from the Kubernetes manifests (k8s/), never from this file.
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Requirements first, so code changes do not invalidate the dependency layer.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY setup.py README.md LICENSE ./
COPY trainer ./trainer
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin trainer

USER 10001

ENTRYPOINT ["python", "-m", "trainer.task"]
