using Akka.Actor;
using Akka.Serialization;

namespace ActorVmm.Host.Control;

/// <summary>
/// Hyperion, built at its first use. A host serializes only what crosses remoting (`ctl`, other
/// nodes), yet Akka builds every configured serializer when the actor system starts, and building
/// Hyperion's (expression trees compiled for its value serializers) is among the slowest steps of
/// a host's start. Same identifier and wire format as <see cref="HyperionSerializer"/>, so a peer
/// that uses Hyperion directly (the `ctl` client) reads what this writes and the other way round.
/// </summary>
public sealed class LazyHyperionSerializer : Serializer
{
    /// <summary><see cref="HyperionSerializer.Identifier"/>: a fixed number in Akka.Serialization.Hyperion.</summary>
    public const int HyperionIdentifier = -5;

    private readonly Lazy<HyperionSerializer> _hyperion;

    public LazyHyperionSerializer(ExtendedActorSystem system) : base(system) =>
        _hyperion = new Lazy<HyperionSerializer>(() => new HyperionSerializer(system));

    /// <summary>With Akka's akka.actor.serialization-settings.hyperion section, as Hyperion takes it.</summary>
    public LazyHyperionSerializer(ExtendedActorSystem system, Akka.Configuration.Config config) : base(system) =>
        _hyperion = new Lazy<HyperionSerializer>(() => new HyperionSerializer(system, config));

    /// <summary>Whether Hyperion has been built (it is at the first message serialized).</summary>
    public bool Created => _hyperion.IsValueCreated;

    public override int Identifier => HyperionIdentifier;

    public override bool IncludeManifest => false;

    public override byte[] ToBinary(object obj) => _hyperion.Value.ToBinary(obj);

    public override object FromBinary(byte[] bytes, Type type) => _hyperion.Value.FromBinary(bytes, type);
}
