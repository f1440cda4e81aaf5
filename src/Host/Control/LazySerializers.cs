using Akka.Actor;
using Akka.Serialization;

namespace ActorVmm.Host.Control;

/// <summary>
/// A serializer built at its first use. A host serializes only what crosses remoting (`ctl`, other
/// nodes), yet Akka builds every configured serializer when the actor system starts, on the
/// critical path of the host's start; some of them are costly to build (Hyperion compiles
/// expression trees for its value serializers, Json.NET sets up its contract machinery). The lazy
/// one has the identifier and wire format of the one it builds, so a peer that uses that one
/// directly (the `ctl` client uses Hyperion) reads what this writes and the other way round.
/// </summary>
public abstract class LazySerializer : Serializer
{
    private readonly Lazy<Serializer> _serializer;

    protected LazySerializer(ExtendedActorSystem system, Func<Serializer> create) : base(system) =>
        _serializer = new Lazy<Serializer>(create);

    /// <summary>Whether the serializer has been built (it is at the first message it handles).</summary>
    public bool Created => _serializer.IsValueCreated;

    public override byte[] ToBinary(object obj) => _serializer.Value.ToBinary(obj);

    public override object FromBinary(byte[] bytes, Type type) => _serializer.Value.FromBinary(bytes, type);
}

/// <summary>
/// <see cref="HyperionSerializer"/>, built at its first use: what ActorVmm's messages cross remoting
/// with. It deserializes only the types <see cref="MessageTypeFilter"/> allows (and none of
/// Hyperion's known-unsafe ones).
/// </summary>
public sealed class LazyHyperionSerializer : LazySerializer
{
    /// <summary><see cref="HyperionSerializer.Identifier"/>: a fixed number in Akka.Serialization.Hyperion.</summary>
    public const int HyperionIdentifier = -5;

    public LazyHyperionSerializer(ExtendedActorSystem system)
        : base(system, () => new HyperionSerializer(system, Restricted(HyperionSerializerSettings.Default))) { }

    /// <summary>With the akka.actor.serialization-settings.hyperion section, as Hyperion takes it.</summary>
    public LazyHyperionSerializer(ExtendedActorSystem system, Akka.Configuration.Config config)
        : base(system, () => new HyperionSerializer(system, Restricted(HyperionSerializerSettings.Create(config)))) { }

    private static HyperionSerializerSettings Restricted(HyperionSerializerSettings settings) =>
        new(settings.PreserveObjectReferences, settings.VersionTolerance, settings.KnownTypesProvider, settings.PackageNameOverrides,
            settings.Surrogates, disallowUnsafeType: true, MessageTypeFilter.Instance);

    public override int Identifier => HyperionIdentifier;

    public override bool IncludeManifest => false;
}

/// <summary>Akka's <see cref="NewtonSoftJsonSerializer"/> (its default serializer, which ActorVmm binds
/// nothing to), built at its first use.</summary>
public sealed class LazyJsonSerializer : LazySerializer
{
    /// <summary>The identifier Akka's reference configuration gives <see cref="NewtonSoftJsonSerializer"/>.</summary>
    public const int JsonIdentifier = 1;

    public LazyJsonSerializer(ExtendedActorSystem system) : base(system, () => new NewtonSoftJsonSerializer(system)) { }

    /// <summary>With the akka.actor.serialization-settings.json section, as Akka's serializer takes it.</summary>
    public LazyJsonSerializer(ExtendedActorSystem system, Akka.Configuration.Config config)
        : base(system, () => new NewtonSoftJsonSerializer(system, config)) { }

    public override int Identifier => JsonIdentifier;

    public override bool IncludeManifest => false;
}
