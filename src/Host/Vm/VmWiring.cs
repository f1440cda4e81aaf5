using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Vm;

/// <summary>One range of a device on a bus: the device, and the offset window the range starts at inside it.</summary>
internal sealed record RouteEntry(DeviceSpec Device, ulong Window)
{
    /// <summary>The device's name: what a <see cref="BusException"/> names.</summary>
    public override string ToString() => Device.Name;
}

/// <summary>
/// How a VM's devices are wired, decided before any actor exists (pure: no Akka actor, no KVM):
/// the devices in creation order — the IOAPIC and the PIC first, since the other devices' IRQ
/// lines name them — and the port and MMIO buses, each range naming its device and window
/// (Firecracker's <c>Bus::insert</c>: buses take (device, base, length) and reject overlaps).
/// <see cref="VmBuilder"/> plans it; the VM actor creates the devices in this order and binds each
/// vcpu's routes to their actors (<see cref="RoutesFor"/>).
/// </summary>
internal sealed record VmWiring(IReadOnlyList<DeviceSpec> Devices, AddressBus<RouteEntry> Ports, AddressBus<RouteEntry> Mmio)
{
    /// <summary>The end of the port space: port 0xFFFF is the last.</summary>
    public const ulong PortSpace = 0x10000;

    /// <summary>
    /// Plans the wiring of <paramref name="devices"/>. Throws <see cref="BusException"/> (naming both
    /// sides) if two devices overlap, if a device overlaps one of <paramref name="reservedMmio"/>
    /// (guest memory's memslots, the local APIC page, the shared-memory window: no exit would ever
    /// reach a device under them), or if a device extends past port 0xFFFF.
    /// </summary>
    public static VmWiring Plan(IReadOnlyList<DeviceSpec> devices, IEnumerable<(string Name, ulong Base, ulong Length)>? reservedMmio = null)
    {
        var reserved = AddressBus<string>.Empty;
        foreach (var (name, @base, length) in reservedMmio ?? []) reserved = reserved.Insert(name, @base, length);
        var ordered = devices.OrderBy(d => d.Name is PcPlatform.IoApicName or PcPlatform.PicName ? 0 : 1).ToArray();
        var ports = AddressBus<RouteEntry>.Empty;
        var mmio = AddressBus<RouteEntry>.Empty;
        // Devices in the order given: an overlap names the later device first. MMIO ranges also go on
        // the reserved bus, which has the memslots' names too.
        foreach (var d in devices)
        foreach (var r in d.Ranges)
        {
            var entry = new RouteEntry(d, r.Window);
            if (r.Space == DeviceProtocol.Space.Port)
            {
                if (r.Base + r.Length > PortSpace) throw new BusException($"device {d.Name} extends past port 0xFFFF");
                ports = ports.Insert(entry, r.Base, r.Length);
            }
            else
            {
                reserved = reserved.Insert(d.Name, r.Base, r.Length);
                mmio = mmio.Insert(entry, r.Base, r.Length);
            }
        }
        return new VmWiring(ordered, ports, mmio);
    }

    /// <summary>
    /// One vcpu's buses, bound to the device actors <paramref name="actorOf"/> names: every range of
    /// a device routes to one <see cref="DeviceRoute"/> of this vcpu (each at its window), so all of
    /// them share the vcpu's write window to that device.
    /// </summary>
    public (AddressBus<DeviceRoute> Ports, AddressBus<DeviceRoute> Mmio) RoutesFor(Func<DeviceSpec, IActorRef> actorOf)
    {
        var routes = new Dictionary<DeviceSpec, DeviceRoute>(ReferenceEqualityComparer.Instance);
        DeviceRoute Route(RouteEntry e)
        {
            if (!routes.TryGetValue(e.Device, out var route))
                routes[e.Device] = route = new DeviceRoute(e.Device.Name, actorOf(e.Device), e.Device.WaitForWrites, e.Device.WaitForWriteAt);
            return route.WithWindow(e.Window);
        }
        return (Bind(Ports, Route), Bind(Mmio, Route));
    }

    private static AddressBus<DeviceRoute> Bind(AddressBus<RouteEntry> bus, Func<RouteEntry, DeviceRoute> route)
    {
        var bound = AddressBus<DeviceRoute>.Empty;
        foreach (var (@base, length, entry) in bus.Entries) bound = bound.Insert(route(entry), @base, length);
        return bound;
    }
}
