# kodkod server image (CPU). The Hugging Face Spaces deploy comes with its own issue.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir .
ENV KODKOD_HOME=/data
EXPOSE 8080
CMD ["kodkod", "serve", "--host", "0.0.0.0", "--port", "8080"]
