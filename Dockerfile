FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml ./
COPY agentsite ./agentsite
COPY chat ./chat
RUN pip install --no-cache-dir .
COPY . .
RUN useradd --system agentsite && mkdir -p /app/var /srv/static && chown agentsite /app/var /srv/static
USER agentsite
EXPOSE 8000
# Daphne through agentsite.serve: the same options, its access log in LOG_FORMAT (JSON).
CMD ["python", "-m", "agentsite.serve", "--bind", "0.0.0.0", "--port", "8000", "--proxy-headers", "agentsite.asgi:application"]
