using Akka.Actor;
using Akka.Serialization;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Vm;

namespace ActorVmm.Host.Tests;

/// <summary>
/// What a host sends over remoting goes through Hyperion built at its first use, not when the actor
/// system starts; on the wire it is Hyperion itself, so a `ctl` client using Hyperion directly
/// reads what the host writes and the other way round. Akka's JSON serializer, bound to nothing,
/// is built only if something uses it.
/// </summary>
public sealed class LazySerializerTests : IAsyncLifetime
{
    private ActorSystem _system = null!;

    public Task InitializeAsync()
    {
        _system = HostRunner.CreateSystem(VmConfig.Load(null), "lazy-serializers");
        return Task.CompletedTask;
    }

    public async Task DisposeAsync() => await _system.Terminate();

    private static VmProtocol.Status Sample() =>
        new("vm0", VmProtocol.Phase.Running, 2, new VmProtocol.Outcome(VmProtocol.OutcomeKind.DebugExit, 1, "guest wrote 0"), ["uart0", "pit"], []);

    private static void AssertSame(VmProtocol.Status expected, object actual)
    {
        var status = Assert.IsType<VmProtocol.Status>(actual);
        Assert.Equal((expected.Vm, expected.Phase, expected.Vcpus, expected.Outcome), (status.Vm, status.Phase, status.Vcpus, status.Outcome));
        Assert.Equal(expected.Devices, status.Devices);
        Assert.Equal(expected.Restarts, status.Restarts);
    }

    [Fact]
    public void The_hosts_serializer_builds_hyperion_at_the_first_message_not_with_the_actor_system()
    {
        var serializer = Assert.IsType<LazyHyperionSerializer>(_system.Serialization.FindSerializerFor(Sample()));
        Assert.False(serializer.Created);
        serializer.ToBinary(Sample());
        Assert.True(serializer.Created);
    }

    [Fact]
    public void What_the_host_writes_hyperion_reads_and_the_other_way_round()
    {
        var host = _system.Serialization.FindSerializerFor(Sample());
        var plain = new HyperionSerializer((ExtendedActorSystem)_system);
        Assert.Equal(plain.Identifier, host.Identifier);
        Assert.Equal(plain.IncludeManifest, host.IncludeManifest);
        AssertSame(Sample(), plain.FromBinary(host.ToBinary(Sample()), typeof(VmProtocol.Status)));
        AssertSame(Sample(), host.FromBinary(plain.ToBinary(Sample()), typeof(VmProtocol.Status)));
    }

    [Fact]
    public void Akkas_json_serializer_is_built_at_its_first_use_and_keeps_its_identifier_and_format()
    {
        var outcome = new VmProtocol.Outcome(VmProtocol.OutcomeKind.Halted, 0, "vcpu 0 halted");
        var plain = new NewtonSoftJsonSerializer((ExtendedActorSystem)_system);
        Assert.Equal(LazyJsonSerializer.JsonIdentifier, plain.Identifier);
        // The system's serializer with that identifier (the lazy one) reads what Akka's own writes.
        Assert.Equal(outcome, _system.Serialization.Deserialize(plain.ToBinary(outcome), plain.Identifier, typeof(VmProtocol.Outcome)));

        var json = new LazyJsonSerializer((ExtendedActorSystem)_system);
        Assert.False(json.Created);
        Assert.Equal(plain.IncludeManifest, json.IncludeManifest);
        Assert.Equal(outcome, plain.FromBinary(json.ToBinary(outcome), typeof(VmProtocol.Outcome)));
        Assert.True(json.Created);
    }
}
