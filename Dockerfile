FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Exactly the runtime lock's packages, each checked against its hash (`make lock` writes
# the locks); this layer is rebuilt only when a lock changes.
COPY requirements-pip.txt requirements.txt ./
RUN pip install --no-cache-dir --require-hashes -r requirements-pip.txt \
    && pip install --no-cache-dir --require-hashes -r requirements.txt
COPY . .
# The project itself: its dependencies all came from the lock.
RUN pip install --no-cache-dir --no-deps -e . && pip check
RUN useradd --system agentsite && mkdir -p /app/var /srv/static && chown agentsite /app/var /srv/static
USER agentsite
EXPOSE 8000
# Daphne through agentsite.serve: the same options, its access log in LOG_FORMAT (JSON).
CMD ["python", "-m", "agentsite.serve", "--bind", "0.0.0.0", "--port", "8000", "--proxy-headers", "agentsite.asgi:application"]
