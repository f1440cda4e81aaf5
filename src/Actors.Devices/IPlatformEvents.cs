namespace ActorVmm.Devices;

/// <summary>
/// What a device model can ask of the machine it sits in: end the VM with a status (debug-exit),
/// reset it (i8042 pulse of the reset line, port 0x92, port 0xCF9), power it off (ACPI S5
/// through PM1_CNT), or drop the hypervisor's mapping of a guest page (pc-testdev). The device's
/// actor turns these into messages.
/// </summary>
public interface IPlatformEvents
{
    void RequestExit(int status, string reason);
    void RequestReset(string reason);
    void RequestPowerOff(string reason);

    /// <summary>Asks the owner of guest memory to drop the hypervisor's mapping of the guest RAM page
    /// holding <paramref name="gpa"/>, keeping its contents, so the guest's next access to it faults
    /// in again; an address outside guest RAM is ignored. A write the vcpu waits for
    /// (<see cref="DeviceProtocol.WriteAndWait"/>) completes only once the flush is done.</summary>
    void RequestPageFlush(ulong gpa);
}

/// <summary>
/// Requests from a device actor to other actors, for the host's wiring of a device (not for models,
/// which see only <see cref="IPlatformEvents"/> and their lines): a write the vcpu waits for
/// (<see cref="DeviceProtocol.WriteAndWait"/>) is answered only once every request made before its
/// answer is <see cref="DeviceProtocol.Completed"/>. The device actor's <see cref="IPlatformEvents"/>
/// implements it.
/// </summary>
public interface IDeviceRequests
{
    /// <summary>Tells <paramref name="target"/> the request built from a new id, as the device
    /// actor; <paramref name="target"/> answers <see cref="DeviceProtocol.Completed"/> with that id.
    /// Nobody (a controller the VM lacks) is not asked: no answer would ever come.</summary>
    void Send(Akka.Actor.IActorRef target, Func<long, object> request);
}

/// <summary>
/// Implemented by models whose host backend has input of its own accord (a network link: a TAP's fd
/// became readable). The backend is read by the model itself, on its actor's thread; whoever watches the
/// backend only says "ready" (<see cref="DeviceProtocol.BackendReady"/>) and waits for the answer before
/// watching again, so one such message at most is in flight.
/// </summary>
public interface IBackendInput
{
    /// <summary>The backend has (or may have) input: take what the device can now, drop what it cannot
    /// take at all (a receiver that is off), leaving the rest for the next call.</summary>
    void BackendReady();
}

/// <summary>Implemented by models that take bytes from the host (a console's keyboard).</summary>
public interface IHostInput
{
    /// <summary>Offers bytes to the device; returns how many it took (the rest stay with the host).</summary>
    int OfferInput(ReadOnlySpan<byte> data);
}
