using System.Collections.Immutable;
using Akka.Actor;
using ActorVmm.Devices;
using static ActorVmm.Lapic.VlapicProtocol;

namespace ActorVmm.Lapic;

/// <summary>
/// The APIC bus of one VM: IPIs from the vlapics (<see cref="Ipi"/>) and interrupt messages from
/// the IOAPIC (<see cref="ApicMessage"/>) become <see cref="DeliverInterrupt"/>s to the destination
/// vlapics; level EOIs (<see cref="LevelEoi"/>) go to the IOAPIC as
/// <see cref="DeviceProtocol.EndOfInterrupt"/>. APIC ID = vcpu id = index in <see cref="Targets.Vlapics"/>.
/// </summary>
public static class ApicRouterProtocol
{
    /// <summary>
    /// Who the router delivers to. Local wiring, filled in once by the VM builder after it created
    /// the vlapics (which need the router's ref first) and before the VM starts; never sent.
    /// </summary>
    public sealed class Targets
    {
        private volatile IActorRef[] _vlapics = [];
        private volatile IActorRef _ioApic = ActorRefs.Nobody;

        /// <summary>Index = vcpu id = APIC ID.</summary>
        public IReadOnlyList<IActorRef> Vlapics { get => _vlapics; set => _vlapics = [.. value]; }

        public IActorRef IoApic { get => _ioApic; set => _ioApic = value; }
    }

    /// <param name="kernel">with in-kernel local APICs (KvmAssisted): the IOAPIC's messages go there
    /// as MSIs instead of to the vlapic actors</param>
    /// <param name="targets">the vlapics and the IOAPIC, filled in by the VM builder</param>
    public static Props Props(Targets targets, IKernelApicBus? kernel = null) =>
        Akka.Actor.Props.Create(() => new ApicRouter(targets, kernel));
}

/// <summary>
/// Delivery rules (SDM Vol 3A §10.6.2, §10.6.1):
/// <list type="bullet">
/// <item>Shorthands: self → the sender; all-including-self → every vlapic; all-excluding-self →
/// every vlapic but the sender (the sender is the APIC with ID <see cref="Ipi.SourceId"/>).</item>
/// <item>Physical destination: the vlapic with that APIC ID (checked again by the vlapic, which
/// may be disabled); 0xFF / 0xFFFFFFFF is the broadcast, sent to all with the destination so
/// that each matches it in its own mode. An ID no vlapic has matches nobody: dropped.</item>
/// <item>Logical destination (flat, cluster, x2APIC): sent to every vlapic with the destination;
/// each vlapic filters itself (<see cref="DeliverInterrupt.To"/>), since only it knows its LDR/DFR.</item>
/// <item>Lowest priority: exactly one matching vlapic takes it. The SDM leaves the choice to the
/// platform (§10.6.2.4); this router does not look at priorities: it starts at a rotating vlapic
/// (round robin, one step per message) and walks the vlapics in APIC ID order, wrapping
/// (<see cref="DeliverToFirstMatch"/>); the first whose destination matches takes it, none → dropped.</item>
/// </list>
/// Never throws on guest input: a bad destination is a dropped message, as on the APIC bus.
/// </summary>
internal sealed class ApicRouter : ReceiveActor
{
    private readonly ApicRouterProtocol.Targets _targets;
    private readonly IKernelApicBus? _kernel;
    private int _lowestPriorityStart;

    /// <summary>Level-triggered messages seen, oldest first: their routes make KVM report the EOIs.</summary>
    private readonly List<(ulong Address, uint Data)> _levelRoutes = [];

    public ApicRouter(ApicRouterProtocol.Targets targets, IKernelApicBus? kernel = null)
    {
        _targets = targets;
        _kernel = kernel;
        Receive<Ipi>(OnIpi);
        Receive<FaultProtocol.Crash>(Faults.Crash); // restarted: level routes are made again as level messages come
        Receive<ApicMessage>(m =>
        {
            if (_kernel is not null)
            {
                ToKernel(m);
                return;
            }
            var to = new Destination(m.LogicalDestination ? DestinationMode.Logical : DestinationMode.Physical, m.Destination);
            var deliver = new DeliverInterrupt(m.Vector, m.Level, m.LevelTriggered ? TriggerMode.Level : TriggerMode.Edge,
                m.Mode, to);
            Route(deliver, to);
        });
        Receive<LevelEoi>(e => _targets.IoApic.Tell(new DeviceProtocol.EndOfInterrupt(e.Vector), Self));
    }

    /// <summary>
    /// In-kernel APICs: one MSI, whose destination the kernel matches. A level-triggered message
    /// first gets a route (if it has none yet), so that the kernel APIC's EOI of its vector comes
    /// back as KVM_EXIT_IOAPIC_EOI; the route is in place before the interrupt can be taken. At
    /// most 24 routes are kept (the IOAPIC's pins): the oldest gives way.
    /// </summary>
    private void ToKernel(ApicMessage m)
    {
        if (!m.Level) return; // a deassert message (only a level INIT has one) means nothing to KVM
        var mode = m.LogicalDestination ? DestinationMode.Logical : DestinationMode.Physical;
        var trigger = m.LevelTriggered ? TriggerMode.Level : TriggerMode.Edge;
        var address = MsiEncoding.Address(m.Destination, mode);
        if (m.LevelTriggered)
        {
            var route = (address, MsiEncoding.Data(m.Vector, m.Mode, level: true, trigger));
            if (!_levelRoutes.Contains(route))
            {
                if (_levelRoutes.Count == MsiEncoding.IoApicRoutes) _levelRoutes.RemoveAt(0);
                _levelRoutes.Add(route);
                _kernel!.SetLevelRoutes(_levelRoutes);
            }
        }
        _kernel!.SignalMsi(address, MsiEncoding.Data(m.Vector, m.Mode, m.Level, trigger));
    }

    private void OnIpi(Ipi ipi)
    {
        if (ApicRouting.TryDeliverDirectly(ipi, _targets.Vlapics, Self)) return;
        var to = new Destination(ipi.DestinationMode, ipi.Destination);
        Route(new DeliverInterrupt(ipi.Vector, ipi.Level, ipi.TriggerMode, ipi.Mode, to), to);
    }

    private void Route(DeliverInterrupt deliver, Destination to)
    {
        var vlapics = _targets.Vlapics;
        if (vlapics.Count == 0) return;
        if (deliver.Mode == DeliveryMode.LowestPriority)
        {
            var start = _lowestPriorityStart++ % vlapics.Count;
            if (_lowestPriorityStart >= vlapics.Count) _lowestPriorityStart = 0;
            var chain = ImmutableArray.CreateBuilder<IActorRef>(vlapics.Count);
            for (var i = 0; i < vlapics.Count; i++) chain.Add(vlapics[(start + i) % vlapics.Count]);
            var first = chain[0];
            chain.RemoveAt(0);
            first.Tell(new DeliverToFirstMatch(deliver, chain.ToImmutable()), Self);
            return;
        }
        ApicRouting.ToDestination(deliver, to, vlapics, Self);
    }
}

/// <summary>
/// The stateless part of the APIC bus's rules (see <see cref="ApicRouter"/>): every delivery but
/// lowest priority, whose round robin lives in the router. Used by the router and by the vlapics
/// themselves, which send their IPIs straight to the destination vlapics (one hop fewer; DESIGN §2).
/// </summary>
internal static class ApicRouting
{
    /// <summary>Delivers an IPI that needs no arbitration; false for lowest priority (the router's).</summary>
    public static bool TryDeliverDirectly(Ipi ipi, IReadOnlyList<IActorRef> vlapics, IActorRef sender)
    {
        var deliver = DeliverInterrupt.For(ipi.Vector, ipi.Level, ipi.TriggerMode, ipi.Mode);
        switch (ipi.Shorthand)
        {
            case Shorthand.Self:
                if (ipi.SourceId >= 0 && ipi.SourceId < vlapics.Count) vlapics[ipi.SourceId].Tell(deliver, sender);
                return true;
            case Shorthand.AllIncludingSelf:
                foreach (var v in vlapics) v.Tell(deliver, sender);
                return true;
            case Shorthand.AllExcludingSelf:
                for (var i = 0; i < vlapics.Count; i++)
                    if (i != ipi.SourceId) vlapics[i].Tell(deliver, sender);
                return true;
            default:
                if (ipi.Mode == DeliveryMode.LowestPriority) return false;
                if (IsOneApic(ipi.DestinationMode, ipi.Destination))
                {
                    // APIC ID = index, and the ID register is read-only: the vlapic at that index
                    // is the one the destination names, with no need to check it again.
                    if (ipi.Destination < (uint)vlapics.Count) vlapics[(int)ipi.Destination].Tell(deliver, sender);
                    return true;
                }
                var to = new Destination(ipi.DestinationMode, ipi.Destination);
                ToDestination(deliver with { To = to }, to, vlapics, sender);
                return true;
        }
    }

    /// <summary>A physical destination other than a broadcast: one APIC at most has that ID (SDM Vol 3A §10.6.2.1).</summary>
    private static bool IsOneApic(DestinationMode mode, uint id) => mode == DestinationMode.Physical && id is not (0xFF or 0xFFFF_FFFF);

    /// <summary>A non-arbitrated delivery to a destination: physical → that APIC ID's vlapic (none for
    /// an unknown ID); broadcast or logical → every vlapic, each matching it itself.</summary>
    public static void ToDestination(DeliverInterrupt deliver, Destination to, IReadOnlyList<IActorRef> vlapics, IActorRef sender)
    {
        if (IsOneApic(to.Mode, to.Id))
        {
            // One APIC at most has this ID; an unknown ID matches nobody.
            if (to.Id < (uint)vlapics.Count) vlapics[(int)to.Id].Tell(deliver, sender);
            return;
        }
        foreach (var v in vlapics) v.Tell(deliver, sender);
    }
}
