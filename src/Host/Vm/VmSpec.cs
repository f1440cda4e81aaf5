using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;

namespace ActorVmm.Host.Vm;

/// <summary>Everything needed to build one VM, already validated (see <see cref="Config.VmConfig"/>).</summary>
public sealed record VmSpec(string Name, ulong MemoryBytes, int Cpus, BootImage Boot)
{
    public const int MaxCpus = 16;
}

/// <summary>A device on a bus: name, address space, base, length, how to build its model, and
/// (for <see cref="IStatefulDevice"/> models) how to rebuild it from its saved state after a crash.</summary>
public sealed record DeviceSpec(string Name, DeviceProtocol.Space Space, ulong Base, ulong Length,
    Func<IPlatformEvents, IBusDevice> Factory, Func<IPlatformEvents, object, IBusDevice>? Restore = null);

/// <summary>The KVM resources of one VM, owned by its <see cref="RunningVm"/>; local, never sent.</summary>
internal sealed record VmResources(string Name, GuestMemoryMap Memory, IReadOnlyList<IVcpu> Vcpus,
    IReadOnlyList<DeviceSpec> Devices, bool Traced);
