"""The EncoderService servicer: proto <-> engine, nothing more."""

from __future__ import annotations

from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.item_status import item_status
from clipsearch.vectors import pack_matrix
from encoder_service.engine import EncoderEngine, ImageSource


class EncoderServicer(encoder_service_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: EncoderEngine):
        self.engine = engine

    async def EmbedTexts(self, request, context):
        vectors = await self.engine.embed_texts(list(request.texts), context.time_remaining())
        return pb.EmbedTextsResponse(embeddings=pack_matrix(vectors), model_fingerprint=self.engine.model.fingerprint)

    async def EmbedImages(self, request, context):
        sources = [
            ImageSource(uri=item.uri) if item.WhichOneof("source") == "uri"
            else ImageSource(data=item.data if item.WhichOneof("source") == "data" else None)
            for item in request.images
        ]
        result = await self.engine.embed_images(sources, context.time_remaining())
        return pb.EmbedImagesResponse(
            embeddings=pack_matrix(result.vectors),
            statuses=[item_status(error) for error in result.errors],
            model_fingerprint=self.engine.model.fingerprint,
        )

    async def GetModelInfo(self, request, context):
        model = self.engine.loaded_model()
        return pb.GetModelInfoResponse(
            model_name=model.name,
            pretrained=model.pretrained,
            dim=model.dim,
            device=str(model.device),
            dtype=model.dtype_name,
            model_fingerprint=model.fingerprint,
            context_length=model.context_length,
            image_size=model.image_size,
            max_batch_size=self.engine.config.max_batch_size,
        )
