using ActorVmm.Host.Vm;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Host.Snapshot;

/// <summary>
/// The parts of a VM's snapshot, by name. Each is one file of the snapshot directory:
/// <list type="bullet">
/// <item><c>spec</c>: <see cref="SavedSpec"/>, what the VM is (memory, vcpus, lapic mode, CPU model, paging, devices);</item>
/// <item><c>clock</c>: <see cref="SavedClock"/>, the VM's device clock and KVM's kvmclock;</item>
/// <item><c>vcpu-N</c>: the vcpu's KVM state and its user-space state (<c>VcpuSnapshot</c>);</item>
/// <item><c>vlapic-N</c>: an emulated local APIC's state (<c>LapicState</c>; none under <c>lapic = assisted</c>,
/// where KVM's local APIC is part of the vcpu's KVM state);</item>
/// <item><c>device-NAME</c>: a device model's state record (<c>DeviceStateCodec</c>);</item>
/// <item><c>memory</c>: guest memory as a sparse file, every segment at its memfd offset, holes where
/// the guest never wrote; <c>memory-ad</c>: the pmap's accessed and dirty bits;</item>
/// <item><c>firmware</c>: the firmware image of a VM that booted one (mapped read-only below 4 GiB, not in guest RAM).</item>
/// </list>
/// </summary>
public static class SnapshotParts
{
    public const string Spec = "spec";
    public const string Clock = "clock";
    public const string Memory = "memory";
    public const string MemoryAccessDirty = "memory-ad";
    public const string Firmware = "firmware";

    public static string Vcpu(int id) => $"vcpu-{id}";
    public static string Vlapic(int id) => $"vlapic-{id}";
    public static string Device(string name) => $"device-{name}";
    public const string DevicePrefix = "device-";
}

/// <summary>What the snapshotted VM is: enough to build the same machine again (the boot image is not
/// needed: guest memory holds everything it loaded).</summary>
/// <param name="Cpu">the CPU model as written on the command line (<see cref="CpuModel.ToString"/>)</param>
/// <param name="HasFirmware">the VM booted a firmware image, saved as the <c>firmware</c> part</param>
/// <param name="Rng">the VM has the virtio entropy device (its state is the <c>device-virtio-rng</c> part)</param>
/// <param name="Disk">the VM's virtio disk (its state is the <c>device-virtio-blk</c> part): the same host file,
/// not a copy of it, is opened again by the restored VM</param>
/// <param name="VirtioConsole">the VM has the virtio console (its state is the <c>device-virtio-console</c> part)</param>
/// <param name="NetTap">the TAP interface of the VM's network card (its state is the <c>device-virtio-net</c>
/// part; a restored VM attaches to the interface of that name again); null: no card</param>
/// <param name="NetMac">the card's address, with <paramref name="NetTap"/></param>
public sealed record SavedSpec(string Name, ulong MemoryBytes, int Cpus, LapicMode Lapic, string Cpu, bool Superpages,
    bool TestDevices, VmspaceOptions? Paging, SharedMemorySpec? SharedMemory, bool HasFirmware, bool Rng = false,
    DiskSpec? Disk = null, bool VirtioConsole = false, string? NetTap = null, string? NetMac = null)
{
    public static SavedSpec From(VmSpec spec) => new(spec.Name, spec.MemoryBytes, spec.Cpus, spec.Lapic, spec.Cpu.ToString(),
        spec.Superpages, spec.TestDevices, spec.Paging, spec.SharedMemory, spec.Boot.Firmware is not null, spec.Rng,
        spec.Disk, spec.VirtioConsole, spec.Net?.Tap, spec.Net?.Mac.ToString());

    /// <summary>The network card, if the VM had one.</summary>
    public NetSpec? NetCard() => NetTap is not null && MacAddress.TryParse(NetMac, out var mac) ? new NetSpec(NetTap, mac) : null;
}

/// <summary>The VM's clocks at the snapshot: its device clock (every armed device and vlapic timer is a
/// deadline on it; a restored VM's clock continues from this value, so no deadline needs converting
/// and guest time never goes back) and KVM's kvmclock (KVM_GET_CLOCK; null when the VM had no KVM clock to save).</summary>
public sealed record SavedClock(TimeSpan DeviceClock, VmKvmState? Kvm);
