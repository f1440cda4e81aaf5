namespace ActorVmm.Devices;

/// <summary>
/// Watches a device actor's model from outside the actor, for a device that runs on another host node
/// than its VM: after every message the actor handled (and after each incarnation is built) it calls
/// <see cref="Handled"/> on the actor's own thread, one call at a time, so the mirror can send the VM's
/// node what changed (the model's state record, output the model produced meanwhile). A mirror outlives
/// the actor's incarnations. It must not throw and must not block.
/// </summary>
public interface IDeviceMirror
{
    /// <param name="model">the model as the message left it</param>
    /// <param name="postedWrite">the message was a posted write (<see cref="DeviceProtocol.Write"/>) that
    /// reached the model (not one held back meanwhile, as during a stall)</param>
    void Handled(IBusDevice model, bool postedWrite);
}
